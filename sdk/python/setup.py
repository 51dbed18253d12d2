"""Build hook: generates the protobuf and gRPC modules from proto/ before packaging
(pyproject.toml holds everything else)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(Path(__file__).resolve().parent / "codegen.py"))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
