"""Generates the gRPC modules from protos/ when the package is built (see protos/build.py)."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        from protos.build import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
