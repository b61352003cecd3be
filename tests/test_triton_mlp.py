"""The Triton kernels of the MLP fast-weight ops (metakernels/triton/fast_weight_mlp.py) against
the float64 reference (docs/ops/fast_weight_mlp.md), in Triton's interpreter
(``TRITON_INTERPRET=1``, float32 and float16, small odd shapes): ``make test-triton`` runs it.

The kernels run through the public ops (``backend="triton"``), and their outputs and every
gradient are compared with the reference backend (autograd with ``create_graph`` through the
unroll) in float64 on the same inputs rounded to the tested dtype, under the same random
cotangents (tests/test_fast_weight_mlp.py's helpers). Every kernel output starts as NaN
(conftest's autouse fixture). Skipped without the interpreter; the ``gpu`` tests at the
benchmark sizes run compiled on a CUDA device (bench/gpu/check.sh).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402

import metakernels as mk  # noqa: E402
from conftest import TOLERANCE  # noqa: E402
from metakernels.ops import _backends  # noqa: E402
from test_fast_weight_mlp import (MlpCase, add_queries, assert_matches,  # noqa: E402
                                  make_mlp_inputs, run, to_dtype)
from test_properties import mlp_problems  # noqa: E402

INTERPRETER = _backends.triton_interpreter()
interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="interpreter tests: run with TRITON_INTERPRET=1 (make test-triton)")
HALF_TOLERANCE = 2e-2   # docs/conventions.md: float16 / bfloat16


# --- every form at small odd shapes, through the public ops --------------------------------------

def rounded(kwargs: dict, dtype, device="cpu") -> tuple[dict, dict]:
    """(the arguments in ``dtype`` on ``device``, the same values in float64 for the
    reference)."""
    def move(t):
        if isinstance(t, torch.Tensor):
            return t.detach().to(device).requires_grad_(t.requires_grad)
        return t
    kwargs = {k: [move(t) for t in v] if isinstance(v, list) else move(v)
              for k, v in kwargs.items()}
    low = to_dtype(kwargs, dtype)
    return low, to_dtype(low, torch.float64)


def check_op(case: MlpCase, form: str, dtype=torch.float32, seed: int = 0, device="cpu",
             **options) -> None:
    """``form``: "unroll", "readout", "A" or "B" (fast_weight_mlp_meta_loss's query forms)."""
    kwargs = make_mlp_inputs(case, torch.float64, seed=seed)
    if form != "unroll":
        kwargs = add_queries(kwargs, case, form)
    low, high = rounded(kwargs, dtype, device)
    meta = form in ("A", "B")
    expected = run(high, "reference", meta)
    result = run(low, "triton", meta, **options)
    for key, value in result.items():
        if value is not None:
            assert value.dtype == dtype and value.device.type == device, key
    tol = TOLERANCE[torch.float32] if dtype == torch.float32 else HALF_TOLERANCE
    assert_matches(result, expected, tol, f"{case} {form} {dtype}")


OP_CASES = {
    "L1-relu-4d-readout": (MlpCase(widths=(5, 3), activation="relu", per_step=True, queries=3,
                                   lr_form="full"), "readout"),
    "L2-tanh-mixed": (MlpCase(layers="mixed", bias="mixed", lr_form="steps"), "unroll"),
    "L3-gelu-readout-scale": (MlpCase(widths=(3, 9, 7, 2), activation="gelu", queries=2,
                                      layers="task", lr_scale=True, lr_form="full"), "readout"),
    "L2-silu-ce-4d": (MlpCase(widths=(4, 6, 5), activation="silu", loss="ce", per_step=True,
                              queries=1, bias="task"), "readout"),
    "L2-relu-ce-nobias": (MlpCase(widths=(6, 7, 3), activation="relu", loss="ce", bias=None,
                                  lr_scale=True), "unroll"),
    "L2-tanh-first-order": (MlpCase(per_step=True, queries=2, first_order=True, lr_scale=True,
                                    lr_form="full"), "readout"),
    "L2-gelu-n1-m1": (MlpCase(widths=(1, 7, 1), activation="gelu", support=1, queries=1,
                              steps=4), "readout"),
    "meta-A-mse-scale": (MlpCase(queries=3, layers="mixed", lr_scale=True, lr_form="full"), "A"),
    "meta-A-ce-first-order": (MlpCase(widths=(4, 5, 3), loss="ce", queries=4, first_order=True,
                                      activation="silu"), "A"),
    "meta-B-ce-4d": (MlpCase(widths=(4, 6, 3), loss="ce", queries=2, activation="gelu",
                             per_step=True, bias="task"), "B"),
    "meta-B-mse-3d": (MlpCase(queries=2, activation="relu", lr_form="steps"), "B"),
}


@interpreter
@pytest.mark.parametrize("name", list(OP_CASES))
def test_matches_reference(name):
    case, form = OP_CASES[name]
    check_op(case, form, torch.float32, seed=len(name))


@interpreter
@pytest.mark.parametrize("name", ["L2-tanh-mixed", "L2-silu-ce-4d", "meta-B-mse-3d"])
def test_float16(name):
    case, form = OP_CASES[name]
    check_op(case, form, torch.float16, seed=len(name) + 1)


@interpreter
@pytest.mark.parametrize("name,case,form", [
    ("unroll-4d-L3", MlpCase(widths=(3, 5, 4, 2), activation="silu", steps=4, queries=2,
                             per_step=True, layers="mixed", lr_form="full"), "readout"),
    ("meta-B", MlpCase(steps=5, queries=2, activation="tanh", lr_scale=True), "B"),
    ("meta-A-ce", MlpCase(widths=(3, 4, 3), loss="ce", steps=4, queries=2), "A"),
])
def test_checkpoint(name, case, form):
    """checkpoint=True: θ_t kept every ⌈√T⌉ steps, each segment recomputed by the forward
    kernel before its backward."""
    check_op(case, form, torch.float32, seed=len(name), checkpoint=True)


@interpreter
@pytest.mark.parametrize("width", [1, 3, 63, 65])
def test_odd_widths(width):
    """Hidden widths on both sides of a power of two (63 pads to 64, 65 to 128), and 1."""
    check_op(MlpCase(widths=(2, width, 3), activation="tanh", steps=2, support=3, queries=1,
                     tasks=2), "readout", torch.float32, seed=width)


@interpreter
def test_reductions():
    case = MlpCase(queries=2, bias="task", first_order=True)
    kwargs = add_queries(make_mlp_inputs(case, seed=3), case, "A")
    low, high = rounded(kwargs, torch.float32)
    for reduction in ("mean", "sum", "none"):
        expected = run(high, "reference", True, reduction)
        assert_matches(run(low, "triton", True, reduction), expected, TOLERANCE[torch.float32],
                       reduction)


@interpreter
def test_limits():
    """Widths past 128 (ttt-mlp's 256) are refused by the probe with the reason; under
    backend="triton" the op raises it before any kernel runs, under "auto" it is never chosen
    (and widths within run)."""
    from metakernels import triton as kernels
    assert kernels.mlp_unsupported_reason([1, 40, 40, 1], 10, 10) is None
    assert kernels.mlp_unsupported_reason([7, 128, 3], 128, 0) is None
    why = kernels.mlp_unsupported_reason([64, 256, 64], 16, 16)
    assert why is not None and "256" in why and "128" in why
    assert kernels.mlp_unsupported_reason([8, 8], 2000, 0) is not None   # [2048, 16] rows
    case = MlpCase(widths=(2, 129, 2), steps=1)
    kwargs = to_dtype(make_mlp_inputs(case), torch.float32)
    with pytest.raises(RuntimeError, match="129"):
        mk.fast_weight_mlp_unroll(**kwargs, backend="triton")



@interpreter
def test_empty_batch_and_no_grad():
    """B = 0 gives empty outputs and zero gradients; under no_grad nothing is kept (stride 0)
    and θ_T still matches the reference."""
    case = MlpCase(tasks=2, queries=2)
    kwargs = to_dtype(add_queries(make_mlp_inputs(case, seed=4), case, "A"), torch.float32)
    empty = dict(kwargs, x=kwargs["x"][:0], y=kwargs["y"][:0], query_x=kwargs["query_x"][:0],
                 query_y=kwargs["query_y"][:0])
    loss = mk.fast_weight_mlp_meta_loss(**empty, backend="triton")
    grads = torch.autograd.grad(loss, kwargs["weights"] + [empty["x"]])
    assert float(loss.detach()) == 0.0 and all(float(g.abs().sum()) == 0.0 for g in grads)
    plain = {k: v for k, v in kwargs.items() if k not in ("query_x", "query_y")}
    with torch.no_grad():
        got = mk.fast_weight_mlp_unroll(**plain, backend="triton")
        want = mk.fast_weight_mlp_unroll(**to_dtype(plain, torch.float64), backend="reference")
    assert_matches({"w": got.weights[0], "losses": got.losses},
                   {"w": want.weights[0], "losses": want.losses}, TOLERANCE[torch.float32])


@interpreter
@settings(max_examples=4)
@given(problem=mlp_problems())
def test_drawn_problems(problem):
    """tests/test_properties.py's drawn MLP calls (1 to 3 layers of widths 1 to 12, every form),
    float32, checkpointed or not."""
    case, form, checkpoint, seed = problem
    check_op(case, form, torch.float32, seed=seed, checkpoint=checkpoint)


@interpreter
@pytest.mark.parametrize("form", ["readout", "A", "B"])
def test_custom_op_path_and_opcheck(form):
    """The registered custom ops (what torch.compile runs) on the Triton backend: the same
    gradients as the eager fast path, and opcheck (schema, fake tensors, autograd registration)
    on the forward op."""
    from metakernels.ops import fast_weight_mlp as mlp_ops
    case = MlpCase(activation="gelu", queries=2, lr_form="full", layers="mixed")
    kwargs = to_dtype(add_queries(make_mlp_inputs(case), case, form), torch.float32)
    eager = run(kwargs, "triton", form in ("A", "B"))
    original = mlp_ops._plain_eager
    try:
        mlp_ops._plain_eager = lambda *tensors: False
        traced = run(kwargs, "triton", form in ("A", "B"))
    finally:
        mlp_ops._plain_eager = original
    assert_matches(traced, eager, 1e-6)
    B = case.tasks
    w = [t.detach().expand(B, *t.shape[-2:]).contiguous().requires_grad_()
         for t in kwargs["weights"]]
    b = [t.detach().expand(B, t.shape[-1]).contiguous().requires_grad_()
         for t in kwargs["biases"]]
    queries = kwargs.get("query_x", kwargs.get("queries")).detach().requires_grad_()
    query_y = kwargs["query_y"].detach() if form in ("A", "B") else None
    args = (w, b, kwargs["x"].detach().requires_grad_(), kwargs["y"].detach(),
            kwargs["lr"].detach().requires_grad_(), [], queries, query_y, 2, 0, False, 1, 0,
            "triton")
    torch.library.opcheck(torch.ops.metakernels.fast_weight_mlp_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))

# --- compiled, on a GPU (bench/gpu/check.sh) -----------------------------------------------------

GPU_CASES = {
    "maml-sinusoid": (MlpCase(widths=(1, 40, 40, 1), tasks=25, steps=5, support=10,
                              activation="relu", queries=10), "A"),
    "ttt-like-128": (MlpCase(widths=(64, 128, 64), tasks=4, steps=8, support=16,
                             activation="gelu", per_step=True, queries=16, lr_form="steps"), "B"),
    "odd-silu-ce-readout": (MlpCase(widths=(33, 65, 7), tasks=5, steps=4, support=21,
                                    activation="silu", loss="ce", queries=3, layers="mixed",
                                    bias="mixed", lr_scale=True, lr_form="full"), "readout"),
}


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETER, reason="GPU tests run compiled, not interpreted")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_matches_reference(name, dtype):
    case, form = GPU_CASES[name]
    check_op(case, form, dtype, seed=len(name), device="cuda")
    check_op(case, form, dtype, seed=len(name), device="cuda", checkpoint=True)
