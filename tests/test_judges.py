"""The reference and every backend against judges that no one here wrote: an independent
torch.func second-order MAML (inner gradient by autograd, not the closed form of
docs/ops/fast_weight_unroll.md), `higher`, `torchopt`, and flash-linear-attention's naive delta rule
(our op with n = 1)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import metakernels as mk
from conftest import COMPILED_BACKENDS, Case, cotangents, make_inputs, rel_err, run_unroll

BACKENDS = ["reference"] + COMPILED_BACKENDS


def inner_loss(weight, bias, x, y, loss):
    """ℓ of one task: ½‖XW + b − Y‖² / n, or the mean cross-entropy."""
    logits = x @ weight + (0 if bias is None else bias)
    if loss == "mse":
        return 0.5 * ((logits - y) ** 2).sum() / x.shape[0]
    return torch.nn.functional.cross_entropy(logits, y)


def torch_func_unroll(weight, x, y, lr, *, steps, loss, bias, lr_scale, bias_lr_scale, queries):
    """One task's unrolled loop with torch.func.grad as the inner gradient."""
    readouts = []
    for t in range(steps):
        x_t, y_t = (x[t], y[t]) if x.dim() == 3 else (x, y)
        g_weight, g_bias = torch.func.grad(inner_loss, argnums=(0, 1))(
            weight, bias if bias is not None else torch.zeros(weight.shape[-1], dtype=weight.dtype),
            x_t, y_t, loss)
        weight = weight - lr[t] * (g_weight if lr_scale is None else lr_scale * g_weight)
        if bias is not None:
            bias = bias - lr[t] * (g_bias if bias_lr_scale is None else bias_lr_scale * g_bias)
        if queries is not None:
            readouts.append(queries[t] @ weight + (0 if bias is None else bias))
    return weight, bias, (torch.stack(readouts) if readouts else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
def test_matches_torch_func_maml(backend, loss, per_step):
    case = Case(loss=loss, per_step=per_step, weight="shared", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, queries=2)
    inputs = make_inputs(case, seed=7)
    got = run_unroll(inputs, backend)
    names = ["weight", "x", "y", "lr", "bias", "lr_scale", "bias_lr_scale", "queries"]
    if loss == "ce":
        names.remove("y")
    cot_weight, cot_bias, cot_readout = cotangents(
        mk.UnrollOutput(got["weight"], got["bias"], got["losses"], got["readout"]))

    def objective(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries):
        per_task = torch.func.vmap(
            lambda x_, y_, lr_, q_: torch_func_unroll(
                weight, x_, y_, lr_, steps=4, loss=loss, bias=bias, lr_scale=lr_scale,
                bias_lr_scale=bias_lr_scale, queries=q_))
        w_t, b_t, readout = per_task(x, y, lr, queries)
        value = (w_t * cot_weight).sum() + (b_t * cot_bias).sum() + (readout * cot_readout).sum()
        return value, (w_t, b_t, readout)

    args = {k: inputs[k] for k in ["weight", "x", "y", "lr", "bias", "lr_scale", "bias_lr_scale",
                                   "queries"]}
    args = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    argnums = tuple(i for i, k in enumerate(args) if k in names)
    grads, (w_t, b_t, readout) = _grad_with_aux(objective, args, argnums)
    assert rel_err(got["weight"], w_t) < 1e-10
    assert rel_err(got["bias"], b_t) < 1e-10
    assert rel_err(got["readout"], readout) < 1e-10
    for name, grad in zip([list(args)[i] for i in argnums], grads):
        assert rel_err(got[f"grad_{name}"], grad) < 1e-10, name


def _grad_with_aux(objective, args, argnums):
    values = list(args.values())

    def positional(*diff):
        full = list(values)
        for i, v in zip(argnums, diff):
            full[i] = v
        return objective(*full)

    return torch.func.grad(positional, argnums=tuple(range(len(argnums))), has_aux=True)(
        *[values[i] for i in argnums])


class LinearHead(torch.nn.Module):
    """x @ weight + bias, the model whose inner loop the fused op runs."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.bias = torch.nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return x @ self.weight + self.bias


def maml_problem(loss, seed=3):
    case = Case(loss=loss, tasks=4, steps=3, support=6, d_in=9, d_out=5, bias="shared")
    inputs = make_inputs(case, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    query_x = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64) / 3
    query_y = (torch.randn(4, 6, 5, generator=gen, dtype=torch.float64) if loss == "mse"
               else torch.randint(0, 5, (4, 6), generator=gen))
    return inputs, query_x, query_y


def metakernels_maml_grad(inputs, query_x, query_y, loss, backend):
    out = mk.fast_weight_unroll(**inputs, backend=backend)
    outer = sum(inner_loss(out.weight[b], out.bias[b], query_x[b], query_y[b], loss)
                for b in range(query_x.shape[0]))
    return torch.autograd.grad(outer, [inputs["weight"], inputs["bias"]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_matches_higher(backend, loss):
    higher = pytest.importorskip("higher")
    inputs, query_x, query_y = maml_problem(loss)
    model = LinearHead(inputs["weight"], inputs["bias"])
    optimizer = torch.optim.SGD(model.parameters(), lr=inputs["lr"])
    for b in range(query_x.shape[0]):
        with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(inputs["steps"]):
                diffopt.step(inner_loss(fmodel.weight, fmodel.bias, inputs["x"][b], inputs["y"][b], loss))
            inner_loss(fmodel.weight, fmodel.bias, query_x[b], query_y[b], loss).backward()
    got = metakernels_maml_grad(inputs, query_x, query_y, loss, backend)
    assert rel_err(got[0], model.weight.grad) < 1e-10
    assert rel_err(got[1], model.bias.grad) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_matches_torchopt(backend, loss):
    torchopt = pytest.importorskip("torchopt")
    inputs, query_x, query_y = maml_problem(loss, seed=11)
    model = LinearHead(inputs["weight"], inputs["bias"])
    inner_optimizer = torchopt.MetaSGD(model, lr=inputs["lr"])
    initial = torchopt.extract_state_dict(model)
    for b in range(query_x.shape[0]):
        for _ in range(inputs["steps"]):
            inner_optimizer.step(inner_loss(model.weight, model.bias, inputs["x"][b], inputs["y"][b], loss))
        inner_loss(model.weight, model.bias, query_x[b], query_y[b], loss).backward()
        torchopt.recover_state_dict(model, initial)
    got = metakernels_maml_grad(inputs, query_x, query_y, loss, backend)
    assert rel_err(got[0], model.weight.grad) < 1e-10
    assert rel_err(got[1], model.bias.grad) < 1e-10


def fla_delta_rule_recurrence():
    """flash-linear-attention's naive delta rule, loaded from its file alone: importing the
    `fla` package would pull in its Triton kernels, which need a GPU."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (fla-core) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "ops", "delta_rule", "naive.py")
    module_spec = importlib.util.spec_from_file_location("fla_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.delta_rule_recurrence


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fla_naive_delta_rule(backend):
    """With n = 1, mse, no bias and a readout, the op is the delta rule: S = W, β_t = η_t,
    k_t = x_t, v_t = y_t, q_t = queries_t (fla scales q by d_k^-½ itself)."""
    recurrence = fla_delta_rule_recurrence()
    batch, heads, length, d_k, d_v = 2, 3, 9, 7, 5
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch, heads, length, d_k, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(batch, heads, length, d_k, generator=gen), dim=-1)
    v = torch.randn(batch, heads, length, d_v, generator=gen)
    beta = torch.rand(batch, heads, length, generator=gen).sigmoid()
    state0 = torch.randn(batch, heads, d_k, d_v, generator=gen)
    for t in (q, k, v, beta, state0):
        t.requires_grad_()
    o_fla, state_fla = recurrence(q, k, v, beta, initial_state=state0)
    cot_o, cot_state = torch.randn_like(o_fla), torch.randn_like(state_fla)
    grads_fla = torch.autograd.grad([o_fla, state_fla], [q, k, v, beta, state0], [cot_o, cot_state])

    tasks = batch * heads
    out = mk.fast_weight_unroll(
        state0.reshape(tasks, d_k, d_v), k.reshape(tasks, length, 1, d_k),
        v.reshape(tasks, length, 1, d_v), beta.reshape(tasks, length),
        queries=(q * d_k ** -0.5).reshape(tasks, length, 1, d_k), backend=backend)
    o = out.readout.reshape(batch, heads, length, d_v)
    state = out.weight.reshape(batch, heads, d_k, d_v)
    assert rel_err(o, o_fla) < 1e-5
    assert rel_err(state, state_fla) < 1e-5
    grads = torch.autograd.grad([o, state], [q, k, v, beta, state0], [cot_o, cot_state])
    for name, got, want in zip(["q", "k", "v", "beta", "initial_state"], grads, grads_fla):
        assert rel_err(got, want) < 1e-4, name
