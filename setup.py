"""Generates the gRPC code from proto/ before the package is built (see scripts/gen_protos.py)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        gen = runpy.run_path(str(Path(__file__).parent / "scripts" / "gen_protos.py"))
        gen["generate"]()
        gen["generate_oip"]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
