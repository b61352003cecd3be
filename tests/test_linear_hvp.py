"""linear_hvp (docs/ops/linear_hvp.md): the reference against torch.func's Hessian-vector product of
the inner loss, and every backend against the reference, values and gradients."""

from __future__ import annotations

import pytest
import torch

import metakernels as mk
from conftest import COMPILED_BACKENDS, TOLERANCE, rel_err

BACKENDS = ["reference"] + COMPILED_BACKENDS


def make_hvp_inputs(loss, tasks=3, support=5, d_in=7, d_out=6, shared=False, bias="task",
                    v_bias="task", dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    shapes = {None: None, "shared": (d_out,), "task": (tasks, d_out)}
    return dict(
        weight=randn(*((d_in, d_out) if shared else (tasks, d_in, d_out))),
        x=randn(tasks, support, d_in), v=randn(tasks, d_in, d_out), loss=loss,
        bias=None if bias is None else randn(*shapes[bias]),
        v_bias=None if v_bias is None else randn(*shapes[v_bias]))


def torch_func_hvp(weight, x, v, loss, bias, v_bias):
    """Hv by forward-over-reverse autodiff of one task's inner loss, vmapped over tasks."""
    d_out = weight.shape[-1]
    labels = torch.zeros(x.shape[:2], dtype=torch.long)  # the Hessian does not depend on labels
    targets = torch.zeros(*x.shape[:2], d_out, dtype=x.dtype)

    def task_loss(w, b, x_t, y_t, label_t):
        logits = x_t @ w + b
        if loss == "mse":
            return 0.5 * ((logits - y_t) ** 2).sum() / x_t.shape[0]
        return torch.nn.functional.cross_entropy(logits, label_t)

    def task_hvp(w, b, x_t, vw, vb, y_t, label_t):
        grad = torch.func.grad(task_loss, argnums=(0, 1))
        return torch.func.jvp(lambda w_, b_: grad(w_, b_, x_t, y_t, label_t), (w, b), (vw, vb))[1]

    tasks = x.shape[0]
    weight = weight.expand(tasks, *weight.shape[-2:])
    bias = torch.zeros(tasks, d_out, dtype=x.dtype) if bias is None else bias.expand(tasks, d_out)
    v_bias = torch.zeros(tasks, d_out, dtype=x.dtype) if v_bias is None else v_bias.expand(tasks, d_out)
    return torch.func.vmap(task_hvp)(weight, bias, x, v, v_bias, targets, labels)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("shared", [False, True], ids=["task-weight", "shared-weight"])
@pytest.mark.parametrize("bias", [None, "shared", "task"])
def test_reference_matches_torch_func(loss, shared, bias):
    inputs = make_hvp_inputs(loss, shared=shared, bias=bias, v_bias=bias)
    hv_weight, hv_bias = mk.linear_hvp(**inputs, backend="reference")
    want_weight, want_bias = torch_func_hvp(**{k: v.detach() if isinstance(v, torch.Tensor) else v
                                               for k, v in inputs.items()})
    assert rel_err(hv_weight, want_weight) < 1e-12
    if bias is None:
        assert hv_bias is None
    else:
        assert rel_err(hv_bias, want_bias) < 1e-12


SIZES = [(1, 1, 1, 1), (3, 5, 7, 6), (2, 16, 64, 64), (2, 25, 64, 5), (2, 3, 70, 65)]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", [("task", "task", False), ("shared", None, True),
                                  (None, None, False), (None, "shared", True)],
                         ids=["bias-vbias", "shared-bias", "no-bias", "v-bias-only"])
def test_backend_matches_reference(backend, dtype, loss, size, form):
    tasks, support, d_in, d_out = size
    bias, v_bias, shared = form
    inputs = make_hvp_inputs(loss, tasks, support, d_in, d_out, shared=shared, bias=bias,
                             v_bias=v_bias, dtype=dtype, seed=sum(size))
    reference_inputs = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor)
                        else v for k, v in inputs.items()}
    got = mk.linear_hvp(**inputs, backend=backend)
    want = mk.linear_hvp(**reference_inputs, backend="reference")
    assert (got[1] is None) == (want[1] is None) == (bias is None and v_bias is None)
    tol = TOLERANCE[dtype]
    for g, w in zip(got, want):
        if w is not None:
            assert g.dtype == dtype
            assert rel_err(g, w) < tol
    # Gradients through the op (weight enters only the ce Hessian).
    outputs = [t for t in got if t is not None]
    cots = [torch.randn_like(t) for t in outputs]
    leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad(outputs, [inputs[k] for k in leaves], cots, allow_unused=True)
    want_grads = torch.autograd.grad([t for t in want if t is not None],
                                     [reference_inputs[k] for k in leaves],
                                     [c.double() for c in cots], allow_unused=True)
    for name, g, w in zip(leaves, grads, want_grads):
        if w is None or (g is None and not w.any()):
            continue
        assert rel_err(g, w) < tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tasks(backend):
    inputs = make_hvp_inputs("ce", tasks=0, shared=True, bias="shared", v_bias=None)
    hv_weight, hv_bias = mk.linear_hvp(**inputs, backend=backend)
    assert hv_weight.shape == (0, 7, 6) and hv_bias.shape == (0, 6)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_gradcheck(backend):
    inputs = make_hvp_inputs("ce", tasks=2, support=3, d_in=3, d_out=3)
    names = ["weight", "x", "v", "bias", "v_bias"]

    def function(*tensors):
        return mk.linear_hvp(**dict(inputs, **dict(zip(names, tensors))), backend=backend)

    assert torch.autograd.gradcheck(function, [inputs[k] for k in names])
