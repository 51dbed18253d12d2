"""Build hooks: generate the protobuf and gRPC modules from proto/ before packaging, and ship
proto/ in the sdist so a wheel can be built from it (pyproject.toml holds everything else)."""

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(HERE / "codegen.py"))["generate"]()
        super().run()


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        repository_protos = HERE.parent.parent / "proto" / "agentmesh"
        if repository_protos.is_dir():
            shutil.copytree(repository_protos, Path(base_dir) / "proto" / "agentmesh")


setup(cmdclass={"build_py": BuildWithProtos, "sdist": SdistWithProtos})
