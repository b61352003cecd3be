"""The GPU check's own scripts, checked on the CPU: bench/gpu/check.sh parses, and the
compute-sanitizer cases (bench/gpu/sanitize_case.py) find every GPU kernel in the sources, so
their ``--coverage`` run on a GPU fails if a kernel escapes the sanitizer."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_sanitize_case():
    spec = importlib.util.spec_from_file_location("sanitize_case",
                                                  ROOT / "bench" / "gpu" / "sanitize_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sanitize_case_finds_every_cuda_kernel():
    sources = "".join(p.read_text() for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    names = load_sanitize_case().kernel_names("cuda")
    assert len(names) == sources.count("__global__") > 0
    assert {"unroll_forward_kernel", "unroll_backward_kernel", "linear_hvp_kernel"} <= names


def test_sanitize_case_finds_every_triton_kernel():
    sources = "".join(p.read_text() for p in (ROOT / "metakernels" / "triton").glob("*.py"))
    launched = set(re.findall(r"launch\(\s*(\w+_kernel)", sources))  # every _launch.launch(kernel, ...)
    names = load_sanitize_case().kernel_names("triton")
    assert launched and launched <= names


def test_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu" / "check.sh")], check=True)


def test_mlp_triton_script_loads_and_needs_cuda():
    """bench/gpu/mlp_triton.py (check.sh stage 4c) imports and, without a GPU, says so (exit 2)."""
    pytest.importorskip("triton")  # the script times the Triton backend: no triton, no script
    spec = importlib.util.spec_from_file_location("mlp_triton",
                                                  ROOT / "bench" / "gpu" / "mlp_triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.MLP_CONFIGS) >= {"maml-sinusoid", "ttt-mlp"}
    import torch
    if not torch.cuda.is_available():
        assert module.main(["--repeats", "1"]) == 2
