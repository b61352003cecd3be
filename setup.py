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
import importlib.util
import os
import platform
import shutil
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_compat():
    """metakernels/_compat.py, loaded by path: the package itself imports torch and its
    extensions, which do not exist yet."""
    spec = importlib.util.spec_from_file_location(
        "_metakernels_compat", os.path.join(ROOT, "metakernels", "_compat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_compat = _load_compat()


def _cuda_sources():
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if os.environ.get("METAKERNELS_BUILD_CUDA", "1") == "0" or not sources:
        return []
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return []
    return sources


def _cpu_arch():
    return os.environ.get("METAKERNELS_CPU_ARCH", "native")


def _arch_flags():
    """The -march flag of the CPU kernels (none for the compiler's default)."""
    cpu_arch = _cpu_arch()
    if not cpu_arch:
        return []
    # GCC and Clang on Arm spell "this machine" -mcpu.
    arm = platform.machine().lower() in _compat.ARM_MACHINES
    return [f"-mcpu={cpu_arch}" if arm else f"-march={cpu_arch}"]


def _cpu_flags():
    """Compile and link flags of the CPU kernels and the binding."""
    # -Wno-psabi: see CMakeLists.txt.
    compile_flags, link_flags = ["-O3", "-g0", "-Wno-psabi"] + _arch_flags(), []
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
    sources = ["csrc/torch/binding.cpp", "csrc/torch/meta_loss.cpp",
               "csrc/torch/fast_weight_mlp.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
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


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, which also writes metakernels/_build_info.py beside the extensions."""

    def _facts(self) -> dict:
        compiler = cpp_extension.get_cxx_compiler()
        return {
            "VERSION": self.distribution.get_version(),
            "TORCH_VERSION": str(torch.__version__),
            "TORCH_CUDA_VERSION": torch.version.cuda,
            "CUDA_EXTENSION": any(ext.name == "metakernels._C_cuda" for ext in self.extensions),
            "CPU_ARCH": _cpu_arch(),
            "MACHINE": platform.machine(),
            "SANITIZE": os.environ.get("METAKERNELS_SANITIZE", "0") == "1",
            # None where the compiler cannot list them: then nothing is checked at import.
            "CPU_FEATURES": _compat.query_compiler_features(
                [compiler, *_arch_flags()], platform.machine()),
        }

    def build_extensions(self):
        facts = self._facts()
        stamp = os.path.join(self.build_temp, "metakernels-build-facts.txt")
        previous = open(stamp).read() if os.path.exists(stamp) else None
        if previous != repr(facts):
            # Objects compiled against another torch or -march: ninja would keep them, since
            # torch's headers are -isystem and so outside its dependency files, and setuptools
            # would keep an extension newer than its sources.
            shutil.rmtree(self.build_temp, ignore_errors=True)
            self.force = True
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as file:
            file.write(repr(facts))
        self._write_build_info(self.build_lib, facts)
        self._facts_written = facts

    def _write_build_info(self, root: str, facts: dict) -> None:
        path = os.path.join(root, "metakernels", "_build_info.py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(_compat.render_build_info(facts))

    def run(self):
        super().run()
        # In place (build_ext --inplace, pip install -e .) the extensions were copied into the
        # source tree: the build info goes beside them.
        if self.inplace and getattr(self, "_facts_written", None) is not None:
            self._write_build_info(ROOT, self._facts_written)

    def get_outputs(self):
        return super().get_outputs() + [
            os.path.join(self.build_lib, "metakernels", "_build_info.py")]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # The compiled extensions work beside the torch release they were built against only
    # (metakernels/_compat.py). tqdm: the trainer's progress, imported by every `metakernels`
    # command.
    install_requires=[_compat.torch_requirement(torch.__version__), "numpy", "tqdm"],
)
