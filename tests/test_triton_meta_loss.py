"""fast_weight_meta_loss on the Triton backend (the Triton unroll composed with the loss in
PyTorch) against the float64 reference, in Triton's interpreter (``TRITON_INTERPRET=1``, float32
and float16, small odd shapes): ``make test-triton`` runs it. The reference runs on the inputs
rounded to the tested dtype, as in tests/test_triton.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import Case, cast_inputs  # noqa: E402
from metakernels.ops import _backends, meta_loss_path  # noqa: E402
from test_fast_weight_meta_loss import assert_meta_close, make_meta_inputs, run_meta  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _backends.triton_interpreter(),
    reason="interpreter tests: run with TRITON_INTERPRET=1 (make test-triton)")


def rounded(inputs: dict, dtype) -> dict:
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
def test_matches_reference(dtype, loss, form, per_step):
    case = Case(loss=loss, per_step=per_step, tasks=2, steps=3, support=5, d_in=7, d_out=6,
                weight="task", bias="shared", lr_form="full", lr_scale=True)
    low = rounded(make_meta_inputs(case, form, m=3), dtype)
    assert meta_loss_path(**low, backend="triton").startswith("composed:")
    expected = run_meta(cast_inputs(low, torch.float64), "reference")
    assert_meta_close(run_meta(low, "triton"), expected, dtype, f"{case} form {form}")


def test_first_order_and_reductions():
    case = Case(loss="mse", tasks=3, steps=2, support=3, d_in=5, d_out=4, bias="task",
                first_order=True)
    low = rounded(make_meta_inputs(case, "A", m=1), torch.float32)
    for reduction in ("mean", "sum", "none"):
        expected = run_meta(cast_inputs(low, torch.float64), "reference", reduction)
        assert_meta_close(run_meta(low, "triton", reduction), expected, torch.float32, reduction)
