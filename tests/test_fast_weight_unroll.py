"""Every compiled backend against the reference: outputs and every gradient, both losses, both x
forms, shared and per-task weight, bias, every lr form, lr_scale, readout and first_order, in
float64 and float32, on odd sizes (docs/ops/fast_weight_unroll.md and docs/conventions.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import metakernels as mk
from conftest import (COMPILED_BACKENDS, FEATURES, TOLERANCE, Case, assert_close, cast_inputs,
                      make_inputs, rel_err, run_unroll)

pytestmark = pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built")



def check_against_reference(case: Case, dtype, backend: str, seed: int = 0) -> None:
    inputs = make_inputs(case, dtype, seed)
    expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    result = run_unroll(inputs, backend)
    for key, value in result.items():
        if value is not None:
            assert value.dtype == dtype, f"{key} has dtype {value.dtype}, expected {dtype}"
    assert_close(result, expected, TOLERANCE[dtype], label=f"{backend} {case} {dtype}")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("features", range(len(FEATURES)))
def test_matches_reference(backend, dtype, first_order, per_step, loss, features):
    case = Case(loss=loss, per_step=per_step, first_order=first_order, **FEATURES[features])
    check_against_reference(case, dtype, backend, seed=features)


SIZES = [  # (B, T, n, d_in, d_out): ones, odd, across the 64-wide vector blocks, a wide head
    (1, 1, 1, 1, 1),
    (2, 3, 7, 63, 65),
    (3, 2, 16, 64, 64),
    (2, 5, 3, 70, 1),
    (4, 2, 25, 64, 5),
    (1, 3, 1, 129, 17),
]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_sizes(backend, dtype, loss, size):
    B, T, n, d_in, d_out = size
    for per_step in (False, True):
        case = Case(loss=loss, per_step=per_step, tasks=B, steps=T, support=n, d_in=d_in,
                    d_out=d_out, queries=2, weight="task", bias="shared", lr_form="full",
                    lr_scale=True, bias_lr_scale=True)
        check_against_reference(case, dtype, backend, seed=sum(size))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("lr_shape", [None, (), (1,), (4,), (3, 1), (1, 4), (3, 4)],
                         ids=lambda s: "float" if s is None else str(list(s)))
def test_every_lr_form_gets_its_gradient(backend, lr_shape):
    case = Case(loss="ce", bias="task", queries=2)
    inputs = make_inputs(case)
    if lr_shape is not None:
        inputs["lr"] = (0.2 + 0.4 * torch.rand(lr_shape, dtype=torch.float64)).requires_grad_()
    expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    result = run_unroll(inputs, backend)
    assert_close(result, expected, TOLERANCE[torch.float64])
    if lr_shape is not None:
        assert result["grad_lr"].shape == torch.Size(lr_shape)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_first_order_is_fomaml(backend):
    """FOMAML: the meta-gradient of the init is the outer gradient at W_T, passed straight back,
    and x and y get no gradient through the inner steps."""
    case = Case(first_order=True, weight="task")
    inputs = make_inputs(case)
    out = mk.fast_weight_unroll(**inputs, backend=backend)
    outer_grad = torch.randn_like(out.weight)
    grads = torch.autograd.grad(out.weight, [inputs["weight"], inputs["x"], inputs["y"]],
                                outer_grad, allow_unused=True)
    assert torch.equal(grads[0], outer_grad)
    assert grads[1] is None and grads[2] is None
    # ...and it differs from the second-order meta-gradient on the same inputs.
    second = mk.fast_weight_unroll(**dict(inputs, first_order=False), backend=backend)
    (second_grad,) = torch.autograd.grad(second.weight, inputs["weight"], outer_grad)
    assert rel_err(second_grad, outer_grad) > 1e-3


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_losses_are_the_inner_loss_curve(backend):
    """losses[:, t] is the inner loss at (W_t, b_t), detached; with a stable lr it falls."""
    case = Case(loss="mse", steps=6, bias="shared")
    inputs = make_inputs(case)
    inputs["lr"] = 0.5
    out = mk.fast_weight_unroll(**inputs, backend=backend)
    assert not out.losses.requires_grad
    assert out.losses.shape == (3, 6)
    first = 0.5 * ((inputs["x"] @ inputs["weight"] + inputs["bias"] - inputs["y"]) ** 2).sum((1, 2)) / 5
    assert rel_err(out.losses[:, 0], first) < 1e-12
    assert bool((out.losses[:, 1:] < out.losses[:, :-1]).all())


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_deterministic(backend):
    """The same call twice gives bitwise-equal outputs and gradients."""
    case = Case(loss="ce", per_step=True, weight="task", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, queries=3, tasks=8, d_in=33, d_out=10)
    inputs = make_inputs(case, torch.float32)
    first, second = run_unroll(inputs, backend), run_unroll(inputs, backend)
    for key in first:
        if first[key] is not None:
            assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("backend", COMPILED_BACKENDS + ["reference"])
def test_zero_tasks(backend):
    case = Case(tasks=0, bias="task", queries=2, lr_form="full", weight="shared")
    inputs = make_inputs(case)
    out = mk.fast_weight_unroll(**inputs, backend=backend)
    assert out.weight.shape == (0, 7, 6) and out.bias.shape == (0, 6)
    assert out.losses.shape == (0, 4) and out.readout.shape == (0, 4, 2, 6)
    loss = out.weight.sum() + out.readout.sum()
    (grad_weight,) = torch.autograd.grad(loss, inputs["weight"])
    assert torch.equal(grad_weight, torch.zeros(7, 6, dtype=torch.float64))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed, sliced and expanded (stride 0) inputs give the contiguous inputs' answer."""
    case = Case(loss="mse", per_step=True, weight="task", bias="task", lr_form="full",
                lr_scale=True, queries=2)
    inputs = make_inputs(case)
    expected = run_unroll(inputs, backend)

    def strided(t):
        # The same values in a transposed-then-transposed-back layout: not contiguous.
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t.detach()
        return wide[..., ::2].requires_grad_(t.requires_grad)

    odd = {k: strided(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
           for k, v in inputs.items()}
    odd["weight"] = inputs["weight"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not odd["x"].is_contiguous() and not odd["weight"].is_contiguous()
    assert_close(run_unroll(odd, backend), expected, 1e-12)

    # An expanded (stride-0) per-task weight equals the shared weight it expands.
    shared = make_inputs(dataclasses.replace(case, weight="shared"))
    expanded = dict(shared, weight=shared["weight"].detach().expand(3, 7, 6).requires_grad_())
    want, got = run_unroll(shared, backend), run_unroll(expanded, backend)
    assert rel_err(got["weight"], want["weight"]) < 1e-12
    assert rel_err(got["grad_weight"].sum(0), want["grad_weight"]) < 1e-12


# Non-finite values (a diverging lr, inf/NaN inputs), huge ce logits, labels at 0 and d_out - 1
# and d_out = 1: tests/test_edge_cases.py.


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_empty_readout(backend):
    """m = 0 query rows: an empty readout and an empty queries gradient, nothing else changes."""
    inputs = make_inputs(Case(loss="ce", bias="task", queries=1))
    inputs["queries"] = torch.randn(3, 4, 0, 7, dtype=torch.float64, requires_grad=True)
    expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    result = run_unroll(inputs, backend)
    assert result["readout"].shape == (3, 4, 0, 6)
    assert result["grad_queries"].shape == (3, 4, 0, 7)
    assert_close({k: v for k, v in result.items() if k not in ("readout", "grad_queries")},
                 {k: v for k, v in expected.items() if k not in ("readout", "grad_queries")},
                 TOLERANCE[torch.float64])
