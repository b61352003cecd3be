"""On a CUDA device: the reference backend in float32, bfloat16 and float16 (float32 state and
accumulation) against itself in float64, at a realistic shape (docs/conventions.md).
Skipped without a GPU; the CPU tests cover the same code paths in float32 and float64."""

from __future__ import annotations

import pytest
import torch

import metakernels as mk
from conftest import Case, cast_inputs, make_inputs, run_unroll

pytestmark = pytest.mark.gpu


def to_cuda(kwargs: dict) -> dict:
    return {k: v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2),
                                       (torch.float16, 2e-2)], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_reference_low_precision_on_gpu(dtype, tol, loss):
    case = Case(loss=loss, per_step=True, tasks=16, steps=16, support=16, d_in=64, d_out=64,
                queries=4, bias="shared", lr_form="full", lr_scale=True)
    inputs = make_inputs(case, torch.float64, seed=1)
    expected = run_unroll(to_cuda(inputs), "reference")
    result = run_unroll(to_cuda(cast_inputs(inputs, dtype)), "reference")
    assert mk.available_backends("cuda")[-1] == "reference"
    for key, want in expected.items():
        if want is None:
            continue
        got = result[key]
        assert got.dtype == dtype and got.device.type == "cuda"
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err <= tol, f"{key}: {err:.2e}"
