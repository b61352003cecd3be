"""metakernels/_compat.py: the compiled extensions are loaded only beside the torch release and on
a CPU they were built for; otherwise a clear error, never an undefined symbol or SIGILL."""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import metakernels
from metakernels import _compat
from conftest import COMPILED_BACKENDS

needs_extension = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS,
                                     reason="the C++ extension is not built")


def build_info(**changes) -> types.SimpleNamespace:
    """The facts of a build of this checkout for this torch and CPU, with ``changes``."""
    facts = dict(VERSION=metakernels.__version__, TORCH_VERSION=str(torch.__version__),
                 TORCH_CUDA_VERSION=torch.version.cuda, CUDA_EXTENSION=False, CPU_ARCH="native",
                 MACHINE=platform.machine(), CPU_FEATURES=[])
    facts.update(changes)
    return types.SimpleNamespace(**facts)


@pytest.mark.parametrize("version, release", [
    ("2.13.0+cpu", "2.13.0"), ("2.13.0+cu130", "2.13.0"), ("2.13.0+rocm6.4", "2.13.0"),
    ("2.13.0+xpu", "2.13.0"), ("2.13.0", "2.13.0"), ("2.14.1", "2.14.1"),
    # Not a platform label: a source build's commit, the old pre-C++11-ABI variant.
    ("2.13.0a0+git1a2b3c4", "2.13.0a0+git1a2b3c4"), ("2.1.0+cpu.cxx11.abi", "2.1.0+cpu.cxx11.abi"),
])
def test_torch_release(version, release):
    assert _compat.torch_release(version) == release
    assert _compat.torch_requirement(version) == f"torch=={release}"


def test_torch_problem_accepts_another_platform_build_of_the_same_release():
    assert _compat.torch_problem(build_info(TORCH_VERSION="2.13.0+cpu"), "2.13.0+cu130") is None
    assert _compat.torch_problem(build_info(TORCH_VERSION="2.13.0+cu130"), "2.13.0") is None
    assert _compat.torch_problem(None, "1.0.0") is None  # no build info: nothing to check


def test_torch_problem_names_another_release():
    message = _compat.torch_problem(build_info(TORCH_VERSION="2.13.0+cpu"), "2.14.1+cu130")
    for part in ("built against torch 2.13.0+cpu", "torch 2.14.1+cu130 is installed",
                 "pip install torch==2.13.0", "pip install --no-build-isolation ."):
        assert part in message, (part, message)


X86_MACROS = """#define __SSE2__ 1
#define __SSE3__ 1
#define __SSSE3__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __LZCNT__ 1
#define __AVX512F__ 1
#define __x86_64__ 1
"""


def test_compiler_cpu_features_from_macros():
    assert _compat.compiler_cpu_features(X86_MACROS, "x86_64") == [
        "abm", "avx", "avx2", "avx512f", "fma", "pni", "ssse3"]
    arm = "#define __ARM_FEATURE_SVE 1\n#define __ARM_FEATURE_DOTPROD 1\n#define __aarch64__ 1\n"
    assert _compat.compiler_cpu_features(arm, "aarch64") == ["asimddp", "sve"]
    assert _compat.compiler_cpu_features("", "x86_64") == []


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("c++") is None,
                    reason="needs an x86-64 C++ compiler")
def test_query_compiler_features_of_a_portable_target():
    v3 = _compat.query_compiler_features(["c++", "-march=x86-64-v3"], "x86_64")
    assert {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"} <= set(v3)
    assert not any(flag.startswith("avx512") for flag in v3)
    v2 = _compat.query_compiler_features(["c++", "-march=x86-64-v2"], "x86_64")
    assert "avx" not in v2 and {"sse4_2", "popcnt"} <= set(v2)
    assert _compat.query_compiler_features(["c++", "-march=no-such-cpu"], "x86_64") is None
    assert _compat.query_compiler_features(["/no/such/compiler"], "x86_64") is None


def test_host_cpu_features(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2\n\n"
                   "processor\t: 1\nflags\t\t: fpu sse2 avx avx2\n")
    assert _compat.host_cpu_features(str(x86)) == {"fpu", "sse2", "avx", "avx2"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve asimddp\n")
    assert _compat.host_cpu_features(str(arm)) == {"fp", "asimd", "sve", "asimddp"}
    other = tmp_path / "other"
    other.write_text("processor\t: 0\n")
    assert _compat.host_cpu_features(str(other)) is None
    assert _compat.host_cpu_features(str(tmp_path / "missing")) is None
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert "sse2" in _compat.host_cpu_features()


def test_cpu_problem():
    info = build_info(CPU_FEATURES=["avx", "avx2", "avx512f", "avx512bw"])
    problem = _compat.cpu_problem(info, {"sse2", "avx", "avx2"})
    assert "-march=native" in problem and "lacks: avx512bw, avx512f." in problem
    assert "METAKERNELS_CPU_ARCH=x86-64-v3" in problem
    assert _compat.cpu_problem(info, {"avx", "avx2", "avx512f", "avx512bw", "sse2"}) is None
    assert _compat.cpu_problem(info, None) is None  # this CPU's flags unknown: not checked
    assert _compat.cpu_problem(build_info(CPU_FEATURES=None), set()) is None  # nor the build's
    assert _compat.cpu_problem(None, set()) is None
    default = _compat.cpu_problem(build_info(CPU_ARCH="", CPU_FEATURES=["avx"]), set())
    assert "the compiler's default target" in default


def test_cuda_problem():
    info = build_info(CUDA_EXTENSION=True, TORCH_CUDA_VERSION="13.0")
    assert "has no CUDA" in _compat.cuda_problem(info, None)
    assert "this torch uses CUDA 12.8" in _compat.cuda_problem(info, "12.8")
    assert _compat.cuda_problem(info, "13.0") is None
    assert _compat.cuda_problem(info, "13.2") is None  # CUDA's minor-version compatibility
    assert _compat.cuda_problem(build_info(CUDA_EXTENSION=False), None) is None
    assert _compat.cuda_problem(None, None) is None


def test_build_info_of_this_install_matches_it():
    info = _compat.load_build_info()
    if info is None:
        pytest.skip("no metakernels/_build_info.py (the extension was built by an older setup.py "
                    "or not at all)")
    assert info.VERSION == metakernels.__version__
    assert _compat.torch_release(info.TORCH_VERSION) == _compat.torch_release(torch.__version__)
    assert _compat.cpu_problem(info, _compat.host_cpu_features()) is None


def run_python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports the metakernels these tests import (this
    checkout's, or an installed wheel's), from outside the checkout."""
    environ = {**os.environ, "PYTHONPATH": str(pathlib.Path(metakernels.__file__).parents[1])}
    environ.pop(_compat.DISABLE_ENV, None)
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                          env=environ, capture_output=True, text=True, timeout=300)


# Puts a build info with the given facts where `import metakernels` looks for one.
FAKE_BUILD_INFO = """
    import platform, sys, types
    import torch
    info = types.ModuleType("metakernels._build_info")
    info.__dict__.update(VERSION="0.1.0", TORCH_VERSION=str(torch.__version__),
                         TORCH_CUDA_VERSION=torch.version.cuda, CUDA_EXTENSION=False,
                         CPU_ARCH="native", MACHINE=platform.machine(), CPU_FEATURES=[])
    info.__dict__.update({facts})
    sys.modules["metakernels._build_info"] = info
"""

# `import metakernels` where the cpu backend must be left out: prints the RuntimeWarnings of the
# import (WARNING:) and the error of asking for the cpu backend (ERROR:), after checking that
# no compiled code loaded and that auto runs the reference.
CPU_LEFT_OUT = """
    import sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import metakernels as mk
    assert not getattr(sys.modules.get("metakernels._C"), "unroll_forward", None)
    print("WARNING:", *[w.message for w in caught if w.category is RuntimeWarning])
    assert mk.available_backends("cpu") == ["reference"], mk.available_backends("cpu")
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    assert mk.fast_weight_unroll(torch.zeros(3, 4), x, y, 0.1, steps=2).weight.shape == (2, 3, 4)
    try:
        mk.fast_weight_unroll(torch.zeros(3, 4), x, y, 0.1, steps=2, backend="cpu")
    except RuntimeError as error:
        print("ERROR:", error)
"""


def left_out_reasons(result: subprocess.CompletedProcess) -> tuple[str, str]:
    """The WARNING: and ERROR: lines of a run of CPU_LEFT_OUT, which must have succeeded."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return (next(line for line in lines if line.startswith("WARNING:")),
            next(line for line in lines if line.startswith("ERROR:")))


@needs_extension
def test_import_beside_another_torch_leaves_the_compiled_backends_out(tmp_path):
    """A wheel beside another torch release: `import metakernels` works, no compiled code loads,
    available_backends leaves cpu out, auto runs the reference, and asking for the cpu backend
    raises the reason, naming the torch the wheel was built for."""
    result = run_python(
        FAKE_BUILD_INFO.format(facts="TORCH_VERSION='2.9.1+cu128'") + CPU_LEFT_OUT, tmp_path)
    warning, error = left_out_reasons(result)
    for text in (warning, error):
        assert ("metakernels 0.1.0 was built against torch 2.9.1+cu128, but torch "
                f"{torch.__version__} is installed") in text, text
        assert "pip install torch==2.9.1" in text, text
    assert "backend 'cpu' is not available" in error
    assert "undefined symbol:" not in result.stdout + result.stderr  # the dynamic loader's form


def test_import_without_the_extension_works(tmp_path):
    """No compiled extension at all (a checkout never built, or a failed build): the import
    works and the reference runs; asking for the cpu backend says it was not built."""
    result = run_python("""
    import sys, torch
    sys.modules["metakernels._C"] = sys.modules["metakernels._C_cuda"] = None  # cannot import
    """ + CPU_LEFT_OUT, tmp_path)
    _, error = left_out_reasons(result)
    assert "metakernels was built without its C++ extension" in error, error


@needs_extension
def test_escape_hatch_loads_no_compiled_code(tmp_path):
    result = run_python(FAKE_BUILD_INFO.format(facts="TORCH_VERSION='2.9.1'") + """
    import sys
    import metakernels as mk
    assert "metakernels._C" not in sys.modules
    assert mk.available_backends("cpu") == ["reference"], mk.available_backends("cpu")
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    out = mk.fast_weight_unroll(torch.zeros(3, 4), x, y, 0.1, steps=2)  # auto: the reference
    assert out.weight.shape == (2, 3, 4)
    try:
        mk.fast_weight_unroll(torch.zeros(3, 4), x, y, 0.1, steps=2, backend="cpu")
    except RuntimeError as error:
        print(error)
    """, tmp_path, METAKERNELS_DISABLE_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert "METAKERNELS_DISABLE_EXTENSIONS=1 is set" in result.stdout


@needs_extension
def test_cpu_without_the_built_instruction_sets_leaves_the_cpu_backend_out(tmp_path):
    result = run_python(FAKE_BUILD_INFO.format(
        facts="CPU_FEATURES=['sse2', 'metakernels_test_isa']") + CPU_LEFT_OUT, tmp_path)
    warning, error = left_out_reasons(result)
    for text in (warning, error):
        assert "lacks: metakernels_test_isa." in text and "illegal instruction" in text, text
    assert "The cpu backend is unavailable" in warning
    assert "backend 'cpu' is not available" in error


@needs_extension
def test_no_build_info_is_not_checked(tmp_path):
    """A source tree built by an older setup.py has an extension but no build info: it loads as
    before (here beside a torch that claims another version)."""
    result = run_python("""
    import sys
    import torch
    sys.modules["metakernels._build_info"] = None  # import metakernels._build_info fails
    torch.__version__ = "2.9.1"
    import metakernels as mk
    print(mk.available_backends("cpu"))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "'cpu'" in result.stdout


def test_version_command_says_what_was_built_against(capsys):
    from metakernels.cli import main, version_text
    text = version_text()
    assert text.startswith(f"metakernels {metakernels.__version__}\n")
    assert f"torch {torch.__version__}" in text
    info = _compat.load_build_info()
    if info is not None:
        assert f"built against torch {info.TORCH_VERSION}" in text
    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    assert exit_code.value.code == 0
    assert capsys.readouterr().out == text + "\n"
