"""Build glue: the C library and the simulated GPU are built by make and
shipped inside the package, so `vgpuctl run` finds libvgpu-hook.so with no
path to configure; the ABI module is built by cffi in API mode."""

import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithLibhook(build_py):
    def run(self) -> None:
        subprocess.check_call(
            ["make", "-C", os.path.join(HERE, "libhook"),
             "LIBOUT=" + os.path.join(HERE, "vgpu_cgroup", "_lib")]
        )
        super().run()


setup(
    cmdclass={"build_py": BuildWithLibhook},
    cffi_modules=["vgpu_cgroup/_wire/_abi_build.py:ffibuilder"],
)
