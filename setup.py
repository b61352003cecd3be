"""Builds metakernels._C (the fused CPU kernels) and, where it can be built, the separate
metakernels._C_cuda (the CUDA kernels of backend="cuda": csrc/torch/binding_cuda.cpp and
csrc/cuda/*.cu).

    pip install --no-build-isolation -e .

Environment:
    METAKERNELS_BUILD_CUDA=0   never build metakernels._C_cuda (default: build it when csrc/cuda
                               has sources, a CUDA toolkit is found (CUDA_HOME) and torch is a
                               CUDA build).
    TORCH_CUDA_ARCH_LIST=...   the GPU architectures of metakernels._C_cuda, e.g. "9.0" or
                               "8.0;9.0" (torch's variable; default here: sm_80 and sm_90).
    METAKERNELS_CPU_ARCH=...   the -march (-mcpu on Arm) of the CPU kernels (default: native, the
                               machine that builds; e.g. x86-64-v3 for a binary that other
                               machines run; empty for the compiler's default).
    METAKERNELS_SANITIZE=1     build metakernels._C with AddressSanitizer and
                               UndefinedBehaviorSanitizer, for tests only (`make test-sanitize`
                               runs pytest on it with libasan preloaded).
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
    if os.environ.get("METAKERNELS_SANITIZE", "0") == "1":
        # -g after -g0 so that reports carry line numbers; UB aborts so that the test fails.
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        compile_flags += sanitize + ["-fno-sanitize-recover=undefined", "-g"]
        link_flags += sanitize
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code: without -fopenmp it runs on one thread. The
        # extension binds to the libgomp.so.1 that torch ships and has already loaded, so one
        # OpenMP runtime runs. (Elsewhere the compiler may have no OpenMP: one thread, same answer.)
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return compile_flags, link_flags


def _cpu_extension():
    cxx_flags, link_flags = _cpu_flags()
    sources = ["csrc/torch/binding.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")]
    return cpp_extension.CppExtension(
        "metakernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags)


def _cuda_extension():
    """metakernels._C_cuda, or None where it cannot be built. The architectures come from
    TORCH_CUDA_ARCH_LIST when it is set (cpp_extension reads it), else sm_80 and sm_90."""
    cuda_sources = _cuda_sources()
    if not cuda_sources:
        return None
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    return cpp_extension.CUDAExtension(
        "metakernels._C_cuda", ["csrc/torch/binding_cuda.cpp"] + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": nvcc_flags})


def _extensions():
    cuda = _cuda_extension()
    return [_cpu_extension()] + ([cuda] if cuda is not None else [])


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
