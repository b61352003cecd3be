"""Whether this install's compiled extensions fit the torch and the CPU they run beside.

setup.py records the facts of each build in ``metakernels/_build_info.py``, beside the extensions
it built (the functions here compute them; setup.py loads this file by path, so it imports only
the standard library). Before any compiled code is loaded, ``ops/_backends.py`` asks:

- :func:`torch_problem`: beside another torch release than the build's, no compiled extension
  is loaded: ``import metakernels`` works, with the reference and Triton backends (Python), and
  asking for the cpu or cuda backend raises this reason, which names the build's torch. Every
  extension is compiled against libtorch's C++ headers and ABI,
  which torch does not keep between releases: beside another torch one may fail to load (an
  undefined symbol) or load and misbehave. (The _C built against 2.13.0+cpu happens to load and
  agree beside 2.14.1+cu130; nothing promises that of the next pair, so the check is on the
  release, not on what happens to load.)
- :func:`cpu_problem`: a CPU without an instruction set that the CPU kernels were compiled for
  (``METAKERNELS_CPU_ARCH``, default ``native``) leaves the cpu backend unavailable with the
  reason, instead of dying of SIGILL in the first call. The rest of metakernels (the reference,
  Triton and CUDA backends) runs on that CPU.
- :func:`cuda_problem`: ``_C_cuda`` beside a torch without CUDA, or of another CUDA major
  version, leaves the cuda backend unavailable with the reason.

Without a build info (a source checkout that was never built, or was built before this module
existed) nothing is checked.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess

BUILD_INFO_MODULE = "metakernels._build_info"
# Set to 1: load no compiled extension at all (the reference and Triton backends, which are
# Python, still run).
DISABLE_ENV = "METAKERNELS_DISABLE_EXTENSIONS"

# A local version label that names the compute platform of one torch release (2.13.0+cpu,
# 2.13.0+cu130, +rocm6.4, +xpu). The platform builds of a release are built from the same
# sources with the same _GLIBCXX_USE_CXX11_ABI, so the CPU extension's libtorch_cpu and libc10
# symbols do not depend on the label; the CUDA extension's own needs are checked by
# cuda_problem. Any other label (a source build's +git<sha>, the old +cpu.cxx11.abi, whose ABI
# differs) is part of the identity.
_PLATFORM_LABEL = re.compile(r"cpu|cu\d+|rocm[\d.]+|xpu")

# The compiler's predefined macro of each instruction set it may emit in the CPU kernels, and
# the flag naming that set in /proc/cpuinfo.
_X86_FEATURES = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2",
    "__FMA__": "fma", "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2",
    "__LZCNT__": "abm", "__MOVBE__": "movbe", "__ADX__": "adx", "__AES__": "aes",
    "__PCLMUL__": "pclmulqdq", "__SHA__": "sha_ni", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd",
    "__AVX512VL__": "avx512vl", "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq",
    "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16", "__AVXVNNI__": "avx_vnni",
    "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16", "__AMX_INT8__": "amx_int8",
}
_ARM_FEATURES = {
    "__ARM_FEATURE_DOTPROD": "asimddp", "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
    "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16", "__ARM_FEATURE_MATMUL_INT8": "i8mm",
    "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2",
    "__ARM_FEATURE_SVE_MATMUL_INT8": "svei8mm",
}
ARM_MACHINES = ("arm64", "aarch64")


def torch_release(version: str) -> str:
    """The part of a torch version that its C++ ABI depends on: ``2.13.0+cpu`` -> ``2.13.0``,
    ``2.13.0a0+git1234`` unchanged."""
    public, _, label = str(version).partition("+")
    return public if _PLATFORM_LABEL.fullmatch(label) else str(version)


def torch_requirement(version: str) -> str:
    """The requirement a wheel built against torch ``version`` states: ``torch==2.13.0``."""
    return f"torch=={torch_release(version)}"


def compiler_cpu_features(macros: str, machine: str) -> list[str]:
    """The /proc/cpuinfo flags of the instruction sets that a compiler's predefined macros
    (``c++ -march=... -dM -E``) enable, sorted."""
    defined = set(re.findall(r"^#define (\w+)", macros, re.MULTILINE))
    table = _ARM_FEATURES if machine.lower() in ARM_MACHINES else _X86_FEATURES
    return sorted({flag for macro, flag in table.items() if macro in defined})


def query_compiler_features(command: list[str], machine: str) -> list[str] | None:
    """:func:`compiler_cpu_features` of the compiler ``command`` (compiler and its -march flags);
    None when the compiler cannot say (not GCC or Clang)."""
    try:
        result = subprocess.run([*command, "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return compiler_cpu_features(result.stdout, machine)


def render_build_info(facts: dict) -> str:
    """The text of ``metakernels/_build_info.py`` holding ``facts`` (names -> literals)."""
    lines = ['"""The facts of the build of the compiled extensions beside this file. Written by',
             'setup.py; metakernels/_compat.py reads them at import."""', ""]
    lines += [f"{name} = {value!r}" for name, value in facts.items()]
    return "\n".join(lines) + "\n"


def load_build_info():
    """The ``_build_info`` module of this install, or None where there is none."""
    try:
        return importlib.import_module(BUILD_INFO_MODULE)
    except ImportError:
        return None


def extensions_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def torch_problem(info, torch_version: str) -> str | None:
    """Why the extensions of ``info`` cannot load beside torch ``torch_version`` (they were
    built against another torch release), or None."""
    if info is None or torch_release(info.TORCH_VERSION) == torch_release(torch_version):
        return None
    return (
        f"metakernels {info.VERSION} was built against torch {info.TORCH_VERSION}, but torch "
        f"{torch_version} is installed. Its compiled kernels are built for the C++ ABI of that "
        f"torch, which torch does not keep between releases: beside another they may fail to "
        f"load (an undefined symbol) or load and misbehave, so they are not loaded. Either "
        f"install that torch (pip install {torch_requirement(info.TORCH_VERSION)}) or rebuild "
        f"metakernels against this one (pip install --no-build-isolation . in its source; -e . "
        f"for a checkout you work in).")


def host_cpu_features(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The instruction-set flags of this CPU (Linux's /proc/cpuinfo: ``flags`` on x86,
    ``Features`` on Arm), or None where they cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                key, colon, value = line.partition(":")
                if colon and key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def cpu_problem(info, host_features: set[str] | None) -> str | None:
    """Why the CPU kernels of ``info`` cannot run on a CPU with ``host_features``, or None (also
    where either side is unknown)."""
    wanted = getattr(info, "CPU_FEATURES", None)
    if wanted is None or host_features is None:
        return None
    missing = sorted(set(wanted) - host_features)
    if not missing:
        return None
    arch = f"-march={info.CPU_ARCH}" if info.CPU_ARCH else "the compiler's default target"
    return (f"metakernels._C was compiled for {arch} (on the machine that built it), which uses "
            f"instructions this CPU lacks: {', '.join(missing)}. Running it would crash with an "
            f"illegal instruction. Rebuild metakernels on this machine (pip install "
            f"--no-build-isolation .), or build a wheel for a target that every machine you run "
            f"on has, e.g. METAKERNELS_CPU_ARCH=x86-64-v3 (or x86-64-v2, or empty for the "
            f"compiler's default)")


def cuda_problem(info, torch_cuda: str | None) -> str | None:
    """Why the ``_C_cuda`` of ``info`` cannot load beside a torch whose CUDA version is
    ``torch_cuda`` (None: a CPU build), or None."""
    if info is None or not info.CUDA_EXTENSION:
        return None
    built = info.TORCH_CUDA_VERSION
    if torch_cuda is None:
        return (f"metakernels._C_cuda was built against a CUDA {built} build of torch, and this "
                f"torch has no CUDA")
    if str(torch_cuda).split(".")[0] != str(built).split(".")[0]:
        return (f"metakernels._C_cuda was built against CUDA {built}, and this torch uses CUDA "
                f"{torch_cuda}; rebuild metakernels against it (pip install "
                f"--no-build-isolation .)")
    return None
