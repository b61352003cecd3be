"""The Gram-space path of the cpu backend (mse, 3-D x; csrc/cpu/fast_weight_gram.cpp): every
input form it accepts against the reference, the switch between it and the step loop on both
sides of each of its conditions, and its float32 accuracy over long, aggressive unrolls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import metakernels as mk
from conftest import TOLERANCE, Case, assert_close, cast_inputs, make_inputs, rel_err, run_unroll
from metakernels.ops import _backends
from metakernels.ops.fast_weight_unroll import unroll_path

pytestmark = pytest.mark.skipif(_backends._extension()[0] is None,
                                reason="the cpu backend is not built")

# Sizes where the Gram path is cheaper than the step loop (n small next to d_in).
GRAM_SIZES = dict(tasks=3, steps=4, support=5, d_in=40, d_out=19)

# Every input form the path accepts (mse, 3-D x, no lr_scale), each lr form, each weight and
# bias form, with and without a readout.
ACCEPTED = [
    dict(weight="shared", bias=None, lr_form="float"),
    dict(weight="task", bias="shared", lr_form="full"),
    dict(weight="shared", bias="task", lr_form="steps"),
    dict(weight="task", bias=None, lr_form="tasks"),
    dict(weight="shared", bias="shared", lr_form="scalar"),
    dict(weight="task", bias="shared", lr_form="full", queries=3),
    dict(weight="shared", bias=None, lr_form="steps", queries=1),
]


def expected_path(inputs: dict) -> str:
    """The forward stores W_t (so runs the loop) when x needs a gradient in second order, or
    the queries do."""
    queries = inputs.get("queries")
    stores = ((inputs["x"].requires_grad and not inputs["first_order"])
              or (queries is not None and queries.requires_grad))
    return "steps/gram" if stores else "gram"


def check(inputs: dict, dtype, path: str, tol: float | None = None) -> None:
    assert unroll_path(**inputs, backend="cpu") == path
    expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    result = run_unroll(inputs, "cpu")
    assert_close(result, expected, tol or TOLERANCE[dtype], label=f"{path} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-const", "x-grad"])
@pytest.mark.parametrize("features", range(len(ACCEPTED)))
def test_matches_reference(dtype, first_order, x_grad, features):
    case = Case(first_order=first_order, **GRAM_SIZES, **ACCEPTED[features])
    inputs = make_inputs(case, dtype, seed=features)
    inputs["x"].requires_grad_(x_grad)
    check(inputs, dtype, expected_path(inputs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("size", [(1, 2, 1, 17, 1), (2, 5, 7, 63, 65), (3, 3, 16, 64, 64),
                                  (2, 6, 3, 70, 2), (4, 3, 2, 129, 17)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sizes(dtype, size):
    B, T, n, d_in, d_out = size
    case = Case(tasks=B, steps=T, support=n, d_in=d_in, d_out=d_out, weight="task",
                bias="shared", lr_form="full")
    check(make_inputs(case, dtype, seed=sum(size)), dtype, "steps/gram")


def test_bias_lr_scale_of_ones_is_inside():
    """bias_lr_scale exactly 1 folds into X̃ = [X 1]; any other value, or a wanted gradient of
    it, is outside (the loop runs)."""
    inputs = make_inputs(Case(bias="task", bias_lr_scale=True, **GRAM_SIZES))
    inputs["x"].requires_grad_(False)
    ones = torch.ones(GRAM_SIZES["d_out"], dtype=torch.float64)
    check(dict(inputs, bias_lr_scale=ones), torch.float64, "gram")
    check(dict(inputs, bias_lr_scale=ones.clone().requires_grad_()), torch.float64, "gram/steps")
    almost = ones.clone()
    almost[-1] = 1 + 2 ** -40
    check(dict(inputs, bias_lr_scale=almost), torch.float64, "steps")


@pytest.mark.parametrize("outside", ["lr_scale", "ce", "x4d", "one_step", "wide_n"])
def test_just_outside(outside):
    """Each condition broken alone: the loop runs, and the answer is still exact."""
    sizes = dict(GRAM_SIZES)
    case = Case(bias="shared", lr_form="full", **sizes)
    inputs = make_inputs(case, seed=7)
    inputs["x"].requires_grad_(False)
    check(inputs, torch.float64, "gram")  # the same call before breaking the condition
    if outside == "lr_scale":
        inputs["lr_scale"] = torch.ones(sizes["d_in"], sizes["d_out"], dtype=torch.float64)
    elif outside == "ce":
        inputs = make_inputs(dataclasses.replace(case, loss="ce"), seed=7)
        inputs["x"].requires_grad_(False)
    elif outside == "x4d":
        inputs = make_inputs(dataclasses.replace(case, per_step=True), seed=7)
        inputs["x"].requires_grad_(False)
    elif outside == "one_step":
        inputs = make_inputs(dataclasses.replace(case, steps=1), seed=7)
        inputs["x"].requires_grad_(False)
    elif outside == "wide_n":
        inputs = make_inputs(dataclasses.replace(case, support=sizes["d_in"]), seed=7)
        inputs["x"].requires_grad_(False)
    check(inputs, torch.float64, "steps")


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_cost_boundary(first_order):
    """The cost model's switch (fast_weight.h unroll_gram_cheaper): the widest d_in that still
    runs the loop and the next one, which runs the Gram path, both exact."""
    base = Case(tasks=2, steps=3, support=6, d_out=4, bias="task", lr_form="full",
                first_order=first_order)

    def inputs_for(d_in):
        inputs = make_inputs(dataclasses.replace(base, d_in=d_in), seed=d_in)
        inputs["x"].requires_grad_(False)
        return inputs

    paths = {d_in: unroll_path(**inputs_for(d_in), backend="cpu") for d_in in range(1, 80)}
    switch = min(d for d, p in paths.items() if p == "gram")
    assert switch > 1 and all(paths[d] == "steps" for d in range(1, switch))
    check(inputs_for(switch - 1), torch.float64, "steps")
    check(inputs_for(switch), torch.float64, "gram")


def aggressive_inputs(eta_norm: float, bias: bool, seed: int) -> dict:
    """T = 50 steps with η_t‖K‖ up to eta_norm (K = X̃ X̃ᵀ / n), per task and step. Without a
    bias, x's singular values are spread over a decade, so that the residual has not died out
    after 50 steps and the lr's gradient is well conditioned. With a bias, a readout too."""
    case = Case(steps=50, support=6, d_in=40, d_out=7, tasks=3, lr_form="full", weight="task",
                bias="task" if bias else None, queries=2 if bias else 0)
    inputs = make_inputs(case, seed=seed)
    x = inputs["x"].detach()
    if not bias:
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        spread = torch.logspace(0, -1, case.support, dtype=torch.float64)
        x = u @ torch.diag_embed(spread.expand(case.tasks, -1)) @ vh
    inputs["x"] = x.requires_grad_()
    folded = torch.cat([x, torch.ones_like(x[..., :1])], -1) if bias else x
    top = torch.linalg.eigvalsh(folded @ folded.transpose(1, 2) / case.support)[:, -1]
    decay = torch.linspace(1.0, 0.7, case.steps, dtype=torch.float64)
    inputs["lr"] = ((eta_norm / top)[:, None] * decay).requires_grad_()
    return inputs


@pytest.mark.parametrize("eta_norm", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_float32_long_unroll(eta_norm, bias):
    """float32 over T = 50 steps with η‖K‖ up to 1.5: every output and gradient within the
    float32 tolerance of docs/conventions.md of the float64 reference on the same (rounded)
    inputs."""
    inputs = cast_inputs(aggressive_inputs(eta_norm, bias, seed=11), torch.float32)
    check(inputs, torch.float32, "steps/gram")
    inputs["x"].requires_grad_(False)
    if bias:
        inputs["queries"].requires_grad_(False)
    check(inputs, torch.float32, "gram")


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_readout_without_query_gradient(first_order):
    """A readout whose queries are constants: the forward runs the Gram path too, and the
    readout's adjoints reach the init, x, y and lr through S_{t+1}."""
    case = Case(first_order=first_order, bias="task", lr_form="full", queries=4,
                **dict(GRAM_SIZES, steps=6))
    inputs = make_inputs(case, seed=3)
    inputs["queries"].requires_grad_(False)
    check(inputs, torch.float64, expected_path(inputs))
    inputs["x"].requires_grad_(False)
    check(inputs, torch.float64, "gram")
    out = mk.fast_weight_unroll(**inputs, backend="cpu")
    ref = mk.fast_weight_unroll(**inputs, backend="reference")
    (got,) = torch.autograd.grad(out.readout.sum(), inputs["weight"])
    (want,) = torch.autograd.grad(ref.readout.sum(), inputs["weight"])
    assert rel_err(got, want) < 1e-10  # only the readout's adjoint, none for W_T


def test_losses_fall_on_the_gram_path():
    """The loss curve the Gram forward writes is the reference's, and falls at a stable lr."""
    inputs = make_inputs(Case(bias="shared", **dict(GRAM_SIZES, steps=6)))
    inputs["x"].requires_grad_(False)
    inputs["lr"] = 0.5
    out = mk.fast_weight_unroll(**inputs, backend="cpu")
    ref = mk.fast_weight_unroll(**inputs, backend="reference")
    assert rel_err(out.losses, ref.losses) < 1e-12
    assert bool((out.losses[:, 1:] < out.losses[:, :-1]).all())


def test_gradcheck():
    """Finite differences of the Gram forward (no_grad: no W_t stored, so the Gram path) against
    the Gram backward, every differentiable input, readout included, float64."""
    case = Case(tasks=2, steps=3, support=3, d_in=30, d_out=12, bias="shared", lr_form="full",
                queries=2, weight="task")
    kwargs = make_inputs(case, seed=4)
    with torch.no_grad():
        assert unroll_path(**kwargs, backend="cpu") == "gram"
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def function(*tensors):
        out = mk.fast_weight_unroll(**dict(kwargs, **dict(zip(names, tensors))), backend="cpu")
        return out.weight, out.bias, out.readout

    assert torch.autograd.gradcheck(function, [kwargs[k] for k in names], eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)
