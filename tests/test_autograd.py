"""The autograd layer: gradcheck of the fused backward, opcheck of the custom ops, the double
backward error, and the op under torch.compile."""

from __future__ import annotations

import pytest
import torch

import metakernels as mk
from conftest import COMPILED_BACKENDS, Case, make_inputs, rel_err

pytestmark = pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built")


def unroll_outputs(backend, names, kwargs):
    """fast_weight_unroll as a function of the differentiable tensors, for gradcheck."""
    def function(*tensors):
        out = mk.fast_weight_unroll(**dict(kwargs, **dict(zip(names, tensors))), backend=backend)
        return tuple(t for t in (out.weight, out.bias, out.readout) if t is not None)
    return function


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("case", [
    Case(loss="mse", tasks=2, steps=3, support=3, d_in=4, d_out=3, bias="shared", lr_form="full",
         lr_scale=True, bias_lr_scale=True, queries=2),
    Case(loss="ce", per_step=True, tasks=2, steps=3, support=3, d_in=4, d_out=3, weight="task",
         bias="task", lr_form="steps", lr_scale=True, queries=1),
    Case(loss="mse", per_step=True, tasks=2, steps=2, support=2, d_in=3, d_out=2, queries=2,
         first_order=True),
], ids=["mse-x3d", "ce-x4d", "mse-first-order"])
def test_gradcheck(backend, case):
    """Finite differences of the fused forward against the fused backward, float64."""
    kwargs = make_inputs(case, seed=4)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    tensors = [kwargs[k] for k in names]
    if case.first_order:
        # First order is not the derivative of the forward; only the queries' gradient stays
        # exact (the queries do not enter the inner steps).
        names, tensors = ["queries"], [kwargs["queries"]]
    assert torch.autograd.gradcheck(unroll_outputs(backend, names, kwargs), tensors,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def opcheck_inputs():
    case = Case(loss="ce", per_step=True, weight="task", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, queries=2, tasks=2, steps=3)
    kwargs = make_inputs(case, seed=9)
    lr = kwargs["lr"].detach().requires_grad_()
    return (kwargs["weight"], kwargs["x"], kwargs["y"], lr, kwargs["bias"], kwargs["lr_scale"],
            kwargs["bias_lr_scale"], kwargs["queries"], 1, False, True, "cpu")


def test_opcheck_forward_op():
    torch.library.opcheck(torch.ops.metakernels.fast_weight_unroll_fwd.default, opcheck_inputs())


def test_opcheck_mse_3d_without_options():
    kwargs = make_inputs(Case(loss="mse", steps=3), seed=2)
    lr = torch.full((3, 3), 0.3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.metakernels.fast_weight_unroll_fwd.default,
                          (kwargs["weight"], kwargs["x"], kwargs["y"], lr, None, None, None, None,
                           0, False, False, "cpu"))


def test_opcheck_backward_op():
    args = opcheck_inputs()
    with torch.no_grad():
        outs = torch.ops.metakernels.fast_weight_unroll_fwd(*args)
    weight_t, _, _, readout, residual, states = outs
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]]
    torch.library.opcheck(
        torch.ops.metakernels.fast_weight_unroll_bwd.default,
        (*detached, residual, states, weight_t, torch.randn_like(weight_t),
         torch.randn(2, 6, dtype=torch.float64), torch.randn_like(readout), 1, False,
         [True, True, False, True, True, True, True, True], "cpu"),
        test_utils=("test_schema", "test_faketensor"))


def test_opcheck_linear_hvp_op():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.metakernels.linear_hvp.default,
                          (weight, x, v, bias, None, 1, True, "cpu"))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_double_backward_raises(backend):
    kwargs = make_inputs(Case(loss="mse"))
    out = mk.fast_weight_unroll(**kwargs, backend=backend)
    (grad_weight,) = torch.autograd.grad(out.weight.pow(2).sum(), kwargs["weight"], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        grad_weight.sum().backward()
    # The reference backend supports it.
    out = mk.fast_weight_unroll(**kwargs, backend="reference")
    (grad_weight,) = torch.autograd.grad(out.weight.pow(2).sum(), kwargs["weight"], create_graph=True)
    (second,) = torch.autograd.grad(grad_weight.sum(), kwargs["weight"])
    assert torch.isfinite(second).all()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_no_grad_mode_skips_saved_state(backend):
    kwargs = make_inputs(Case(loss="mse", queries=2))
    with torch.no_grad():
        out = mk.fast_weight_unroll(**kwargs, backend=backend)
    assert out.weight.grad_fn is None
    ref = mk.fast_weight_unroll(**kwargs, backend="reference")
    assert rel_err(out.readout, ref.readout) < 1e-12


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile(backend, compiler):
    """A MAML meta-step compiled with fullgraph=True gives the eager meta-gradient."""
    case = Case(loss="ce", bias="shared", lr_form="full", queries=2)
    kwargs = make_inputs(case, seed=3)

    def meta_step(weight, bias, x, y, lr, queries):
        out = mk.fast_weight_unroll(weight, x, y, lr, steps=4, loss="ce", bias=bias,
                                    queries=queries, backend=backend)
        return out.readout.logsumexp(-1).sum() + out.weight.pow(2).sum()

    args = [kwargs[k] for k in ("weight", "bias", "x", "y", "lr", "queries")]
    compiled = torch.compile(meta_step, fullgraph=True, backend=compiler)
    eager_loss = meta_step(*args)
    eager = torch.autograd.grad(eager_loss, [args[0], args[1], args[4], args[5]])
    compiled_loss = compiled(*args)
    got = torch.autograd.grad(compiled_loss, [args[0], args[1], args[4], args[5]])
    assert rel_err(compiled_loss, eager_loss) < 1e-12
    for g, e in zip(got, eager):
        assert rel_err(g, e) < 1e-12


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_reference_and_backend_agree_under_repeated_calls(backend):
    """Saved tensors belong to each call: two interleaved graphs give their own gradients."""
    first = make_inputs(Case(loss="mse", queries=2), seed=1)
    second = make_inputs(Case(loss="mse", queries=2), seed=2)
    out_first = mk.fast_weight_unroll(**first, backend=backend)
    out_second = mk.fast_weight_unroll(**second, backend=backend)
    (g_second,) = torch.autograd.grad(out_second.readout.sum(), second["weight"])
    (g_first,) = torch.autograd.grad(out_first.readout.sum(), first["weight"])
    assert rel_err(g_first, run_unroll_grad(first)) < 1e-12
    assert rel_err(g_second, run_unroll_grad(second)) < 1e-12


def run_unroll_grad(kwargs):
    out = mk.fast_weight_unroll(**kwargs, backend="reference")
    return torch.autograd.grad(out.readout.sum(), kwargs["weight"])[0]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backward_recomputes_states_it_was_told_it_would_not_need(backend):
    """store_states is a memory hint: a caller of the raw op that passes False and then asks for
    x's gradient still gets the exact gradient (the backward recomputes W_t)."""
    kwargs = make_inputs(Case(loss="ce", per_step=True, bias="shared", lr_form="full", queries=2))
    args = [kwargs[k] for k in ("weight", "x", "y", "lr", "bias")]
    weight_t, _, _, readout, _, states = torch.ops.metakernels.fast_weight_unroll_fwd(
        *args, None, None, kwargs["queries"], 1, False, False, backend)
    assert states.numel() == 0
    objective = weight_t.pow(2).sum() + readout.sum()
    got = torch.autograd.grad(objective, [kwargs["x"], kwargs["queries"], kwargs["weight"]])
    out = mk.fast_weight_unroll(**kwargs, backend="reference")
    want = torch.autograd.grad(out.weight.pow(2).sum() + out.readout.sum(),
                               [kwargs["x"], kwargs["queries"], kwargs["weight"]])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_fake_tensors_go_through_the_custom_ops(backend):
    """In plain eager mode the op skips the custom ops' dispatch (ops/fast_weight_unroll.py,
    _plain_eager); under a fake-tensor mode, as tracers run it, the custom ops' fake kernels
    must run instead of the real kernels, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    kwargs = make_inputs(Case(loss="mse", bias="shared", queries=2))
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}
        out = mk.fast_weight_unroll(**fake, backend=backend)
        grads = torch.autograd.grad(out.readout.sum() + out.weight.sum(),
                                    [fake["weight"], fake["x"], fake["queries"]])
    real = mk.fast_weight_unroll(**kwargs, backend=backend)
    assert out.readout.shape == real.readout.shape and out.weight.shape == real.weight.shape
    assert [g.shape for g in grads] == [kwargs[k].shape for k in ("weight", "x", "queries")]
