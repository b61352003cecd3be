"""Builds metakernels._C: the fused CPU kernels, and the CUDA kernels where they can be built.

    pip install --no-build-isolation -e .

Environment:
    METAKERNELS_BUILD_CUDA=0   never build CUDA sources (default: build them when csrc/cuda has
                               any, a CUDA toolkit is found and torch is a CUDA build).
    METAKERNELS_CPU_ARCH=...   the -march (-mcpu on Arm) of the CPU kernels (default: native, the
                               machine that builds; e.g. x86-64-v3 for a binary that other
                               machines run; empty for the compiler's default).
"""

import glob
import os
import platform
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_sources():
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if os.environ.get("METAKERNELS_BUILD_CUDA", "1") == "0" or not sources:
        return []
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return []
    return sources


def _cpu_flags():
    """Compile and link flags of the CPU kernels and the binding."""
    cpu_arch = os.environ.get("METAKERNELS_CPU_ARCH", "native")
    # -Wno-psabi: see CMakeLists.txt.
    compile_flags, link_flags = ["-O3", "-g0", "-Wno-psabi"], []
    if cpu_arch:
        # GCC and Clang on Arm spell "this machine" -mcpu.
        arm = platform.machine().lower() in ("arm64", "aarch64")
        compile_flags.append(f"-mcpu={cpu_arch}" if arm else f"-march={cpu_arch}")
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code: without -fopenmp it runs on one thread. The
        # extension binds to the libgomp.so.1 that torch ships and has already loaded, so one
        # OpenMP runtime runs. (Elsewhere the compiler may have no OpenMP: one thread, same answer.)
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return compile_flags, link_flags


def _extension():
    cxx_flags, link_flags = _cpu_flags()
    sources = ["csrc/torch/binding.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")]
    cuda_sources = _cuda_sources()
    if cuda_sources:
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                      "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return cpp_extension.CUDAExtension(
            "metakernels._C", sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("METAKERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
    return cpp_extension.CppExtension(
        "metakernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
