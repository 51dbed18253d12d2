"""Build hooks: generate the protobuf and gRPC modules from proto/ before anything is packaged
(here, when setup.py is read — so the generated packages are found like the others), and ship
proto/ in the sdist so a wheel can be built from it (pyproject.toml holds everything else)."""

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent

runpy.run_path(str(HERE / "codegen.py"))["generate"]()


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        repository_protos = HERE.parent.parent / "proto" / "agentmesh"
        if repository_protos.is_dir():
            shutil.copytree(repository_protos, Path(base_dir) / "proto" / "agentmesh")


setup(cmdclass={"sdist": SdistWithProtos})
