"""The Triton backend's chunked kernels (metakernels/triton/fast_weight_chunked.py) in Triton's
interpreter (``TRITON_INTERPRET=1``, ``make test-triton``), float32 and float16 on tiny odd
shapes, against the float64 reference on the same rounded inputs, outputs NaN-poisoned: T not a
multiple of the chunk, T shorter than it, n = 1, 3, 16, d = 1 and odd, bias shared or per task,
lr [B, T], readout m = 1 and 7, shared and per-task init, first order, several column tiles."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOLERANCE, Case, assert_close, make_inputs, run_unroll  # noqa: E402
from metakernels.ops import _backends, unroll_path  # noqa: E402
from test_triton import HALF_TOLERANCE, rounded_reference  # noqa: E402

INTERPRETER = _backends.triton_interpreter()
pytestmark = pytest.mark.skipif(
    not INTERPRETER, reason="interpreter tests: run with TRITON_INTERPRET=1 (make test-triton)")


@contextlib.contextmanager
def triton_chunked(force: int, rows: int = 16):
    module = _backends.kernels("triton")
    module.set_chunked_knobs(force, rows)
    try:
        yield
    finally:
        module.set_chunked_knobs(-1, 64)


CASES = {
    "n1-readout-task": Case(per_step=True, tasks=2, steps=21, support=1, d_in=9, d_out=11,
                            weight="task", lr_form="full", queries=1),
    "n3-bias-shared-m7": Case(per_step=True, tasks=2, steps=7, support=3, d_in=6, d_out=5,
                              bias="shared", lr_form="full", queries=7),
    "n16-bias-task-short": Case(per_step=True, tasks=2, steps=3, support=16, d_in=5, d_out=4,
                                bias="task", weight="task", lr_form="steps"),
    "d1": Case(per_step=True, tasks=2, steps=9, support=1, d_in=1, d_out=1, bias="task",
               queries=1, lr_form="float"),
    "first-order": Case(per_step=True, tasks=2, steps=11, support=3, d_in=7, d_out=6,
                        bias="shared", queries=2, lr_form="full", first_order=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_kernels_match_reference(name, dtype):
    inputs = make_inputs(CASES[name], torch.float64, seed=len(name))
    low, expected = rounded_reference(inputs, dtype)
    with triton_chunked(1):
        path = unroll_path(**low, backend="triton")
        result = run_unroll(low, "triton")
    assert path == "chunked", path
    tol = TOLERANCE[dtype] if dtype == torch.float32 else HALF_TOLERANCE
    assert_close(result, expected, tol, label=f"{name} {dtype}")


def test_chunked_kernels_column_tiles():
    """d_out over several column tiles of BV (d_in = 129 makes BV = 16)."""
    case = Case(per_step=True, tasks=1, steps=5, support=1, d_in=129, d_out=35, bias="shared",
                queries=1, lr_form="full")
    inputs = make_inputs(case, torch.float64, seed=1)
    low, expected = rounded_reference(inputs, torch.float32)
    with triton_chunked(1):
        result = run_unroll(low, "triton")
    assert_close(result, expected, TOLERANCE[torch.float32])


def test_triton_path_switch():
    inside = Case(per_step=True, tasks=1, steps=2, support=16, d_in=4, d_out=3, queries=1)
    inputs = make_inputs(inside, torch.float32, seed=0)
    assert unroll_path(**inputs, backend="triton") == "chunked"
    big = make_inputs(Case(**{**inside.__dict__, "support": 17}), torch.float32, seed=0)
    assert unroll_path(**big, backend="triton") == "steps"
    one = make_inputs(Case(**{**inside.__dict__, "steps": 1}), torch.float32, seed=0)
    assert unroll_path(**one, backend="triton") == "steps/chunked"  # x's gradient: any T
    with torch.no_grad():
        assert unroll_path(**one, backend="triton") == "steps"
    scaled = make_inputs(Case(**{**inside.__dict__, "lr_scale": True}), torch.float32, seed=0)
    assert unroll_path(**scaled, backend="triton") == "steps"
