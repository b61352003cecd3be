"""The Triton kernels of the MLP fast-weight ops (metakernels/triton/fast_weight_mlp.py) against
the float64 reference (docs/ops/fast_weight_mlp.md), in Triton's interpreter
(``TRITON_INTERPRET=1``, float32 and float16, small odd shapes): ``make test-triton`` runs it.

The kernels are called through the backend-level interface the ops use (metakernels/_C.pyi:
``mlp_forward`` / ``mlp_backward``, inputs normalised as the ops normalise them), and their
outputs and every gradient are compared with autograd through the reference unroll (``create_graph``
inner gradients) on the same inputs rounded to the tested dtype, under the same random
cotangents. Every output starts as NaN (conftest's autouse fixture). Skipped without the
interpreter.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from conftest import TOLERANCE, rel_err  # noqa: E402
from metakernels.ops import _backends  # noqa: E402
from metakernels.reference import fast_weight_mlp as reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _backends.triton_interpreter(),
    reason="interpreter tests: run with TRITON_INTERPRET=1 (make test-triton)")
HALF_TOLERANCE = 2e-2   # docs/conventions.md: float16 / bfloat16


@dataclasses.dataclass(frozen=True)
class MLPCase:
    widths: tuple = (3, 7, 5)
    tasks: int = 2
    steps: int = 3
    support: int = 5
    rows: int = 0                 # readout query rows (unroll) or query rows (meta-loss)
    per_step: bool = False        # 4-D x
    loss: str = "mse"
    activation: str = "tanh"
    bias: bool = True
    shared: tuple = ()            # the layers whose init is shared by all tasks
    lr_scale: bool = False
    first_order: bool = False
    meta: str = ""                # "", "A" or "B": meta-loss mode and its query form
    stride: int = 1


def make_inputs(case: MLPCase, seed: int) -> dict:
    """Float64 leaf tensors of the reference's public signature, every float one differentiable."""
    gen = torch.Generator().manual_seed(seed)
    B, T, n, m, w = case.tasks, case.steps, case.support, case.rows, case.widths
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen,  # noqa: E731
                                                   dtype=torch.float64) * scale)
    lead = (B, T, n) if case.per_step else (B, n)
    weights = [randn(*(() if l in case.shared else (B,)), w[l], w[l + 1],
                     scale=1.2 / w[l] ** 0.5) for l in range(len(w) - 1)]
    inputs = dict(
        weights=weights,
        biases=[randn(*(() if l in case.shared else (B,)), w[l + 1], scale=0.3)
                for l in range(len(w) - 1)] if case.bias else None,
        x=randn(*lead, w[0]),
        y=(randn(*lead, w[-1]) if case.loss == "mse"
           else torch.randint(0, w[-1], lead, generator=gen)),
        lr=torch.rand(B, T, generator=gen, dtype=torch.float64) * 0.3 + 0.2,
        lr_scale=([torch.rand(w[l], w[l + 1], generator=gen, dtype=torch.float64) + 0.5
                   for l in range(len(w) - 1)] if case.lr_scale else None),
    )
    if case.meta == "A":
        inputs["query_x"] = randn(B, m, w[0])
        inputs["query_y"] = (randn(B, m, w[-1]) if case.loss == "mse"
                             else torch.randint(0, w[-1], (B, m), generator=gen))
    elif case.meta == "B":
        inputs["query_x"] = randn(B, T, m, w[0])
        inputs["query_y"] = (randn(B, T, m, w[-1]) if case.loss == "mse"
                             else torch.randint(0, w[-1], (B, T, m), generator=gen))
    elif m:
        inputs["queries"] = randn(B, T, m, w[0])
    return inputs


def _leaves(inputs: dict) -> dict:
    """name -> differentiable leaf (lists flattened as name.l)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, list):
            out.update({f"{key}.{l}": v for l, v in enumerate(value)})
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = value
    return out


def _cast(inputs: dict, dtype) -> dict:
    """The inputs in ``dtype`` (labels untouched), fresh leaves that require grad."""
    def one(v):
        if isinstance(v, list):
            return [one(t) for t in v]
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().to(dtype).requires_grad_()
        return v
    return {k: one(v) for k, v in inputs.items()}


def _cotangents(case: MLPCase, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 1000)
    B, T, w = case.tasks, case.steps, case.widths
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if case.meta:
        return {"loss": randn(B)}
    return {"weights": [randn(B, w[l], w[l + 1]) for l in range(len(w) - 1)],
            "biases": [randn(B, w[l + 1]) for l in range(len(w) - 1)] if case.bias else None,
            "readout": randn(B, T, case.rows, w[-1]) if case.rows else None}


def run_reference(case: MLPCase, inputs: dict, cot: dict) -> dict:
    """Outputs and gradients of autograd through the reference, in float64."""
    inputs = _cast(inputs, torch.float64)
    common = dict(activation=case.activation, loss=case.loss, lr_scale=inputs["lr_scale"],
                  first_order=case.first_order)
    if case.per_step:
        common["steps"] = None
    else:
        common["steps"] = case.steps
    args = (inputs["weights"], inputs["biases"], inputs["x"], inputs["y"], inputs["lr"])
    if case.meta:
        out = reference.fast_weight_mlp_meta_loss(*args, inputs["query_x"], inputs["query_y"],
                                                  reduction="none", **common)
        result = {"out": out}
        total = (out * cot["loss"]).sum()
    else:
        ref = reference.fast_weight_mlp_unroll(*args, queries=inputs.get("queries"), **common)
        result = {"losses": ref.losses, "readout": ref.readout}
        result.update({f"weights_T.{l}": w for l, w in enumerate(ref.weights)})
        total = sum((w * c).sum() for w, c in zip(ref.weights, cot["weights"]))
        if case.bias:
            result.update({f"biases_T.{l}": b for l, b in enumerate(ref.biases)})
            total = total + sum((b * c).sum() for b, c in zip(ref.biases, cot["biases"]))
        if case.rows:
            total = total + (ref.readout * cot["readout"]).sum()
    leaves = _leaves(inputs)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    for name, grad, leaf in zip(leaves, grads, leaves.values()):
        result[f"grad_{name}"] = torch.zeros_like(leaf) if grad is None else grad
    return {k: (v.detach() if v is not None else None) for k, v in result.items()}


def run_triton(case: MLPCase, inputs: dict, cot: dict, dtype) -> dict:
    """The same through mlp_forward / mlp_backward, inputs normalised as the ops do."""
    from metakernels import triton as kernels
    inputs = {k: ([t.detach().to(dtype) for t in v] if isinstance(v, list) else
                  v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in inputs.items()}
    B, T, L = case.tasks, case.steps, len(case.widths) - 1
    weights = [w.expand(B, *w.shape[-2:]).contiguous() for w in inputs["weights"]]
    biases = ([b.expand(B, b.shape[-1]).contiguous() for b in inputs["biases"]]
              if case.bias else [])
    lr_scale = inputs["lr_scale"] or []
    act = reference.ACTIVATIONS.index(case.activation)
    loss = ("mse", "ce").index(case.loss)
    queries = inputs.get("query_x", inputs.get("queries"))
    query_y = inputs.get("query_y")
    args = (weights, biases, inputs["x"], inputs["y"], inputs["lr"], lr_scale, queries, query_y)
    fwd = kernels.mlp_forward(*args, act, loss, case.stride)
    losses, out, states = fwd[:3]
    weights_T, biases_T = fwd[3:3 + L], fwd[3 + L:]
    result = {"losses": losses}
    if case.meta:
        result["out"] = out
    else:
        result["readout"] = out if case.rows else None
        result.update({f"weights_T.{l}": w for l, w in enumerate(weights_T)})
        result.update({f"biases_T.{l}": b for l, b in enumerate(biases_T)})
    if case.meta:
        grad_out, gw_final, gb_final = cot["loss"].to(dtype), [], []
    else:
        grad_out = cot["readout"].to(dtype) if case.rows else None
        gw_final = [c.to(dtype) for c in cot["weights"]]
        gb_final = [c.to(dtype) for c in cot["biases"]] if case.bias else []
    wanted = [True] * 8
    grads = kernels.mlp_backward(*args, states, list(weights_T), list(biases_T), gw_final,
                                 gb_final, grad_out, act, loss, case.stride, case.first_order,
                                 wanted)
    result["grad_x"] = grads[0]
    if case.loss == "mse":
        result["grad_y"] = grads[1]
    result["grad_lr"] = grads[2]
    if case.meta:
        result["grad_query_x"] = grads[3]
        if case.loss == "mse":
            result["grad_query_y"] = grads[4]
    elif case.rows:
        result["grad_queries"] = grads[3]
    for l in range(L):
        g = grads[5 + l]
        result[f"grad_weights.{l}"] = g.sum(0) if l in case.shared else g
        if case.bias:
            g = grads[5 + L + l]
            result[f"grad_biases.{l}"] = g.sum(0) if l in case.shared else g
        if case.lr_scale:
            result[f"grad_lr_scale.{l}"] = grads[5 + 2 * L + l]
    return result


def check(case: MLPCase, dtype=torch.float32, seed: int = 0) -> None:
    inputs = make_inputs(case, seed)
    # The reference runs on the inputs rounded to the tested dtype: the tolerance measures the
    # kernels' own error.
    rounded = _cast(_cast(inputs, dtype), torch.float64)
    cot = _cotangents(case, seed)
    if dtype != torch.float32:
        cot = {k: (None if v is None else [c.to(dtype).double() for c in v]
                   if isinstance(v, list) else v.to(dtype).double()) for k, v in cot.items()}
    expected = run_reference(case, rounded, cot)
    result = run_triton(case, rounded, cot, dtype)
    tol = TOLERANCE[torch.float32] if dtype == torch.float32 else HALF_TOLERANCE
    for key, value in expected.items():
        got = result.get(key)
        if value is None:
            assert got is None, key
            continue
        if key == "grad_y" and case.loss == "ce":
            continue
        assert got is not None, f"{key} missing from the triton results ({case})"
        assert got.dtype == dtype, f"{key}: dtype {got.dtype}"
        assert torch.isfinite(got).all(), f"{key}: non-finite (an unwritten element?) {case}"
        err = rel_err(got, value)
        assert err <= tol, f"{key}: relative error {err:.3g} > {tol} ({case}, {dtype})"


# --- every form at small odd shapes --------------------------------------------------------------

CASES = {
    "L2-tanh-3d": MLPCase(),
    "L1-relu-4d-readout": MLPCase(widths=(5, 3), activation="relu", per_step=True, rows=3),
    "L3-gelu-readout-shared": MLPCase(widths=(3, 9, 7, 2), activation="gelu", rows=2,
                                      shared=(0, 2), lr_scale=True),
    "L2-silu-ce-4d": MLPCase(widths=(4, 6, 5), activation="silu", loss="ce", per_step=True,
                             rows=1, shared=(1,)),
    "L2-relu-ce-nobias": MLPCase(widths=(6, 7, 3), activation="relu", loss="ce", bias=False,
                                 lr_scale=True),
    "L2-tanh-first-order": MLPCase(per_step=True, rows=2, first_order=True, lr_scale=True),
    "L2-gelu-m1-n1": MLPCase(widths=(1, 7, 1), activation="gelu", support=1, rows=1,
                             steps=4),
    "L3-silu-stride2": MLPCase(widths=(3, 5, 4, 2), activation="silu", steps=5, rows=2,
                               per_step=True, stride=2, shared=(1,)),
    "meta-A-mse": MLPCase(meta="A", rows=3, shared=(0, 1), lr_scale=True),
    "meta-B-ce": MLPCase(meta="B", loss="ce", rows=2, activation="gelu", per_step=True),
    "meta-B-mse-stride3": MLPCase(meta="B", rows=2, steps=5, stride=3, activation="relu"),
    "meta-A-ce-first-order": MLPCase(meta="A", loss="ce", rows=4, first_order=True,
                                     activation="silu"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_f32(name):
    check(CASES[name], torch.float32, seed=len(name))


@pytest.mark.parametrize("name", ["L2-tanh-3d", "L2-silu-ce-4d", "meta-B-mse-stride3"])
def test_matches_reference_f16(name):
    check(CASES[name], torch.float16, seed=len(name) + 1)


@pytest.mark.parametrize("width", [1, 3, 63, 65])
def test_odd_widths(width):
    """Widths on both sides of a power of two (63 pads to 64, 65 to 128)."""
    check(MLPCase(widths=(2, width, 3), activation="tanh", steps=2, support=3, rows=1,
                  tasks=1), torch.float32, seed=width)


def test_limits():
    """Widths past 128 (ttt-mlp's 256) are refused by the probe and by the launchers, with the
    reason; those within run."""
    from metakernels import triton as kernels
    assert kernels.mlp_unsupported_reason([1, 40, 40, 1], 10, 10) is None
    assert kernels.mlp_unsupported_reason([7, 128, 3], 128, 0) is None
    why = kernels.mlp_unsupported_reason([64, 256, 64], 16, 16)
    assert why is not None and "256" in why and "128" in why
    assert kernels.mlp_unsupported_reason([8, 8], 300, 0) is not None
    case = MLPCase(widths=(2, 129, 2), steps=1)
    inputs = make_inputs(case, 0)
    with pytest.raises(RuntimeError, match="exceeds"):
        run_triton(case, inputs, _cotangents(case, 0), torch.float32)
