"""Numerical edge cases of fast_weight_unroll on every compiled backend against the float64
reference (issue 8, docs/conventions.md, bad input: non-finite values are not clamped, they
propagate):

- learning rates large enough to diverge to inf/NaN, on both CPU paths (the Gram-space form
  builds S = Σ η_t A_t by its own recurrence), the step loop with a readout, first order and
  checkpointed: outputs and every gradient;
- inf and NaN in x or y;
- ce labels all at 0, all at d_out − 1, and both;
- ce with d_out = 1 (softmax over one class: loss 0, no inner gradient);
- huge logits in ce (weights scaled by 1e4 … 1e30, either sign, and huge rows beside normal ones).

What "matches" means where values are not finite:
- float64: every output and gradient is finite exactly where the reference's is, and close to
  it there (the diverged values are huge, so relative to their own norm).
- float32 (and the Triton backend, which runs float32): the reference's float64 values rounded
  to float32 are the truth; the backend is non-finite wherever they are, and within the
  float32 tolerance of docs/conventions.md where both are finite. It may overflow where they do not:
  its intermediates are float32 (the float32 reference overflows there too).

Triton runs here only in its interpreter (``TRITON_INTERPRET=1``; ``make test-triton``), where
COMPILED_BACKENDS includes it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import metakernels as mk
from conftest import (COMPILED_BACKENDS, TOLERANCE, Case, assert_close, cast_inputs,
                      make_inputs, rel_err, run_hvp, run_unroll)

pytestmark = [
    pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built"),
    # Triton's interpreter computes with numpy, which warns on every overflow these tests cause.
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# The dtypes each backend runs on CPU tensors (Triton's float16 is covered by test_triton.py).
DTYPES = {"cpu": (torch.float64, torch.float32), "triton": (torch.float32,)}
BACKEND_DTYPES = [pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")
                  for backend in COMPILED_BACKENDS for dtype in DTYPES.get(backend, ())]


def run(inputs: dict, backend: str, checkpoint=None) -> dict:
    return run_unroll(dict(inputs, checkpoint=checkpoint) if checkpoint is not None else inputs,
                      backend)


def reference(inputs: dict) -> dict:
    return run_unroll(cast_inputs(inputs, torch.float64), "reference")


def scaled_rel_err(got, want) -> float:
    """rel_err on values near the largest float: both divided by want's largest magnitude first,
    so that the norms do not overflow."""
    scale = want.detach().double().abs().max()
    scale = scale if scale > 0 else torch.ones_like(scale)
    return rel_err(got.double() / scale, want.double() / scale)


def assert_non_finite_match(result: dict, expected: dict, dtype, label: str,
                            tol: float | None = None, gradients_finite_beyond: bool = False) -> None:
    """See the module docstring; ``tol`` overrides the tolerance of docs/conventions.md where
    finite. With ``gradients_finite_beyond``, a gradient may be finite where the float64 reference's
    is not (but not the reverse): see test_divergence_at_the_largest_float."""
    tol = TOLERANCE[dtype] if tol is None else tol
    assert result.keys() == expected.keys()
    for key, want in expected.items():
        got = result[key]
        if want is None:
            assert got is None, f"{label} {key}"
            continue
        want = want.detach().to(dtype)
        got = got.detach()
        finite_want, finite_got = torch.isfinite(want), torch.isfinite(got)
        if gradients_finite_beyond and key.startswith("grad_"):
            assert not (finite_want & ~finite_got).any(), (
                f"{label} {key}: not finite at {int((finite_want & ~finite_got).sum())} elements "
                f"where the reference is (of {want.numel()})")
        elif dtype == torch.float64:
            assert torch.equal(finite_got, finite_want), (
                f"{label} {key}: finite at {int((finite_got & ~finite_want).sum())} elements where "
                f"the reference is not, not finite at {int((finite_want & ~finite_got).sum())} "
                f"where it is (of {want.numel()})")
        else:
            assert not (finite_got & ~finite_want).any(), (
                f"{label} {key}: finite at {int((finite_got & ~finite_want).sum())} elements "
                f"where the reference is not (of {want.numel()})")
        both = finite_got & finite_want
        if both.any():
            err = scaled_rel_err(got[both], want[both])
            assert err <= tol, f"{label} {key}: relative error {err:.2e} where finite"


def has_non_finite(values: dict) -> bool:
    return any(not torch.isfinite(v).all() for v in values.values() if v is not None)


# --- divergence ----------------------------------------------------------------------------------

SMALL_N = dict(steps=6, support=3, d_in=9, d_out=4)
# (case, checkpoint, whether x requires grad): which path runs is in the comments (unroll_path).
DIVERGING = {
    "gram": (Case(bias="shared", **SMALL_N), None, False),            # Gram forward and backward
    "steps/gram": (Case(bias="shared", **SMALL_N), None, True),       # step forward, Gram backward
    "steps-mse-readout": (Case(per_step=True, steps=6, queries=2, bias="task", lr_scale=True),
                          None, True),
    "steps-ce-readout": (Case(loss="ce", per_step=True, steps=6, queries=2, bias="task",
                              lr_scale=True, bias_lr_scale=True, lr_form="full"), None, True),
    "ce-3d-first-order": (Case(loss="ce", steps=6, bias="shared", first_order=True), None, True),
    "mse-first-order": (Case(per_step=True, steps=6, queries=2, first_order=True), None, True),
    "checkpoint-gram": (Case(**dict(SMALL_N, steps=9)), True, True),
    "checkpoint-ce": (Case(loss="ce", per_step=True, steps=9, queries=2, bias="task"), True, True),
}
# Per dtype: large learning rates that diverge to huge values (mse to inf and NaN), then an
# infinite one, which makes every case non-finite from the first step (ce too: its inner
# gradient is bounded, so a finite lr overflows it only near the largest float). float64 at
# lr = 1e308: test_divergence_at_the_largest_float.
DIVERGING_LR = {torch.float64: (1e30, 1e150, float("inf")),
                torch.float32: (1e5, 1e30, 3e38, float("inf"))}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("name", DIVERGING)
def test_divergence_propagates(backend, dtype, name):
    """A huge lr diverges to inf/NaN: the values come out, in the outputs and in every gradient,
    nothing raises or is clamped."""
    case, checkpoint, x_grad = DIVERGING[name]
    for lr in DIVERGING_LR[dtype]:
        inputs = make_inputs(case, dtype, seed=3)
        inputs["lr"] = lr
        inputs["x"].requires_grad_(x_grad)
        expected = reference(inputs)
        if lr == DIVERGING_LR[dtype][-1]:
            assert has_non_finite(expected)
        assert_non_finite_match(run(inputs, backend, checkpoint), expected, dtype,
                                f"{backend} {name} lr={lr:g}")


@pytest.mark.parametrize("backend", [b for b in COMPILED_BACKENDS if torch.float64 in
                                     DTYPES.get(b, ())])
@pytest.mark.parametrize("name", DIVERGING)
def test_divergence_at_the_largest_float(backend, name):
    """float64 at lr = 1e308, where lr times an inner-gradient term is near the largest float:
    the outputs match the reference's finite/non-finite pattern exactly, but a gradient can be
    finite where the reference's is inf/NaN. The reference's autograd forms intermediates the
    fused backward does not: X (−η Ŵ) for mse, where the kernels form −η (X D); the
    log_softmax backward's row sum of ê for ce, where the kernels apply the softmax Jacobian
    p ∘ ê − p (pᵀ ê) (with p saturated to one-hot, exactly 0). Those intermediates overflow;
    the gradients themselves do not. The other way round must never happen: the kernels are
    non-finite only where the reference is."""
    case, checkpoint, x_grad = DIVERGING[name]
    inputs = make_inputs(case, torch.float64, seed=3)
    inputs["lr"] = 1e308
    inputs["x"].requires_grad_(x_grad)
    assert_non_finite_match(run(inputs, backend, checkpoint), reference(inputs), torch.float64,
                            f"{backend} {name} lr=1e308", gradients_finite_beyond=True)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("name", ["gram", "steps-mse-readout", "steps-ce-readout",
                                  "checkpoint-ce"])
@pytest.mark.parametrize("where", ["x", "y", "x-nan"])
def test_non_finite_inputs_propagate(backend, dtype, name, where):
    """inf (or NaN) in one element of x or y: that task's outputs and gradients are not finite
    where the reference's are not, and the other tasks are untouched (per-task weight)."""
    case, checkpoint, x_grad = DIVERGING[name]
    if where == "y" and case.loss == "ce":
        pytest.skip("ce labels are integers")
    case = dataclasses.replace(case, weight="task")
    inputs = make_inputs(case, dtype, seed=4)
    inputs["x"].requires_grad_(x_grad)
    value = float("nan") if where == "x-nan" else float("inf")
    with torch.no_grad():
        target = inputs["y" if where == "y" else "x"]
        target[1].view(-1)[target[1].numel() // 2] = value
    expected = reference(inputs)
    result = run(inputs, backend, checkpoint)
    assert not torch.isfinite(result["weight"][1]).all()
    assert torch.isfinite(result["weight"][[0, 2]]).all()
    assert_non_finite_match(result, expected, dtype, f"{backend} {name} {where}")


# --- ce labels, one class, huge logits ----------------------------------------------------------

CE = Case(loss="ce", d_out=5, weight="task", bias="shared", lr_form="full", lr_scale=True,
          bias_lr_scale=True, queries=2)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("labels", ["zero", "last", "both"])
def test_labels_at_the_ends(backend, dtype, per_step, labels):
    case = dataclasses.replace(CE, per_step=per_step)
    for first_order in (False, True):
        inputs = make_inputs(dataclasses.replace(case, first_order=first_order), dtype, seed=5)
        y = inputs["y"]
        inputs["y"] = {"zero": torch.zeros_like(y), "last": torch.full_like(y, case.d_out - 1),
                       "both": torch.where(torch.rand(y.shape) < 0.5, 0, case.d_out - 1)}[labels]
        assert_close(run(inputs, backend), reference(inputs), TOLERANCE[dtype],
                     f"{backend} labels={labels} first_order={first_order}")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
def test_ce_with_one_class(backend, dtype, per_step):
    """d_out = 1: the softmax is 1, the loss 0 and the inner gradient 0, so W_T = W_0 and b_T =
    b_0; the gradients that pass through the inner gradient (x, lr, lr_scale, bias_lr_scale)
    are exactly 0, and nothing divides by zero."""
    case = dataclasses.replace(CE, per_step=per_step, d_out=1)
    inputs = make_inputs(case, dtype, seed=6)
    expected = reference(inputs)
    result = run(inputs, backend)
    assert_close(result, expected, TOLERANCE[dtype], f"{backend} d_out=1")
    assert torch.equal(result["losses"], torch.zeros_like(result["losses"]))
    assert torch.equal(result["weight"], inputs["weight"].detach())
    assert torch.equal(result["bias"], inputs["bias"].detach().expand(case.tasks, 1))
    for key in ("grad_x", "grad_lr", "grad_lr_scale", "grad_bias_lr_scale"):
        assert torch.equal(result[key], torch.zeros_like(result[key])), key
    for key, value in result.items():
        assert value is None or torch.isfinite(value).all(), key


# Logit scales: the weights of every task, of task 0 only (huge rows beside normal ones), or the
# support rows 0 and 2 of x (huge and normal rows in one task).
HUGE = [("weight", 1e4), ("weight", 1e10), ("weight", 1e30), ("weight", -1e30),
        ("task0", 1e30), ("task0", -1e10), ("rows", 1e4), ("rows", -1e10)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("mode,scale", HUGE, ids=[f"{m}{s:g}" for m, s in HUGE])
def test_huge_logits(backend, dtype, per_step, mode, scale):
    """The softmax of logits up to ~1e30 saturates without overflowing: losses, outputs and every
    gradient finite where the reference's are, and equal to it within tolerance."""
    inputs = make_inputs(dataclasses.replace(CE, per_step=per_step), dtype, seed=7)
    with torch.no_grad():
        if mode == "weight":
            inputs["weight"].mul_(scale)
        elif mode == "task0":
            inputs["weight"][0].mul_(scale)
        else:
            inputs["x"][..., 0:3:2, :].mul_(scale)  # rows 0 and 2, in place
    expected = reference(inputs)
    result = run(inputs, backend)
    assert torch.isfinite(result["losses"]).all() and torch.isfinite(result["weight"]).all()
    tol = TOLERANCE[dtype]
    if dtype != torch.float64:
        # Huge rows beside normal ones make some gradients ill-conditioned in float32: allow
        # what the float32 reference itself gets wrong (grad_weight of rows x1e4: ~4e-4).
        own = run_unroll(inputs, "reference")
        tol = max([tol] + [10 * scaled_rel_err(own[k], expected[k]) for k in expected
                           if expected[k] is not None and torch.isfinite(expected[k]).all()
                           and torch.isfinite(own[k]).all()])
    assert_non_finite_match(result, expected, dtype, f"{backend} {mode} x{scale:g}", tol)


# --- linear_hvp ----------------------------------------------------------------------------------

def hvp_inputs(dtype, d_out: int = 5, scale: float = 1.0, seed: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"weight": (3, 7, d_out), "x": (3, 6, 7), "v": (3, 7, d_out), "bias": (d_out,),
              "v_bias": (3, d_out)}
    inputs = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    inputs["weight"] *= scale
    return {k: t.to(dtype).requires_grad_() for k, t in inputs.items()}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("what", ["logits1e30", "logits-1e30", "one-class", "inf-x", "nan-x"])
def test_linear_hvp_edge_cases(backend, dtype, what):
    """ce with saturated softmax (Hv exactly 0 where p is one-hot), d_out = 1 (H_E = 0), and
    non-finite x in one task (that task's Hv non-finite, the others untouched)."""
    loss = "ce"
    if what.startswith("logits"):
        inputs = hvp_inputs(dtype, scale=float(what[len("logits"):]))
    elif what == "one-class":
        inputs = hvp_inputs(dtype, d_out=1)
    else:
        inputs = hvp_inputs(dtype)
        with torch.no_grad():
            inputs["x"][1, 2, 3] = float("inf") if what == "inf-x" else float("nan")
    expected = run_hvp(cast_inputs(dict(inputs, loss=loss), torch.float64), "reference")
    result = run_hvp(dict(inputs, loss=loss), backend)
    assert_non_finite_match(result, expected, dtype, f"{backend} linear_hvp {what}")
    if what in ("logits1e30", "logits-1e30", "one-class"):
        assert torch.equal(result["hv_weight"], torch.zeros_like(result["hv_weight"]))
    elif what.endswith("-x"):
        assert not torch.isfinite(result["hv_weight"][1]).all()
        assert torch.isfinite(result["hv_weight"][[0, 2]]).all()
