"""The contestants: independent ways of computing the same second-order meta-gradient.

Each contestant is a callable ``contestant(problem) -> meta_grad``: forward + backward of one
whole meta-step of a :class:`~metakernels.benchmarks.configs.MetaProblem` (T inner steps on the
support set from the shared init, then the outer loss), returning the gradient of the outer loss
with respect to every meta-parameter, ``{"weight": ..., "bias": ...}`` like ``problem.params``.

The outer loss, summed over tasks: without a readout, the loss of the adapted model on the query
set (mse ½‖z − y‖² / n, ce the mean cross-entropy); with a readout (4-D x), the same loss of the
readout ``O_t`` against ``readout_y``, summed over steps.

- ``metakernels:<backend>``: :func:`metakernels.fast_weight_unroll`, the outer loss in plain
  torch, ``torch.autograd.grad``.
- ``metakernels:<backend>+loss``: :func:`metakernels.fast_weight_meta_loss`, the unroll and the
  outer loss in one op (fused on ``cpu``).
- ``torch.func``: ``vmap`` over tasks of a differentiable unrolled loop whose inner gradient is
  ``torch.func.grad`` of the inner loss (not the closed form of docs/ops/fast_weight_unroll.md),
  differentiated by ``torch.func.grad``: the baseline of docs/conventions.md, benchmark
  configurations.
- ``autograd-loop``: the same loop on all tasks at once (bmm), the inner gradient by
  ``torch.autograd.grad(create_graph=True)``, then the outer backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

import metakernels
from metakernels._losses import mean_loss
from metakernels.benchmarks import peers
from metakernels.benchmarks.configs import MetaProblem
from metakernels.benchmarks.objective import MetaGrad, model, outer_loss, step_inputs

Contestant = Callable[[MetaProblem], MetaGrad]
InnerGrad = Callable[[dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]]

BASELINES = ("torch.func", "autograd-loop")


def unrolled_outer_loss(fast: dict[str, Tensor], batch: dict[str, Tensor], problem: MetaProblem,
                        inner_grad: InnerGrad) -> Tensor:
    """The outer loss after T differentiable inner steps ``θ ← θ − η_t ∇ℓ_t(θ)``.

    Written for either layout: with a leading ``[B]`` on ``fast`` and ``batch`` (autograd-loop)
    or without, one task inside ``vmap`` (torch.func). ``inner_grad(fast, x_t, y_t)`` is the
    contestant's own derivative of the inner loss.
    """
    config = problem.config
    readouts = []
    for t in range(config.steps):
        x_t, y_t, inner_lr = step_inputs(batch, problem, t)
        grads = inner_grad(fast, x_t, y_t)
        fast = {name: value - inner_lr * grads[name] for name, value in fast.items()}
        if "readout_queries" in batch:
            readouts.append(model(batch["readout_queries"].select(-3, t), fast))
    readout = torch.stack(readouts, dim=-3) if readouts else None
    return outer_loss(batch, fast, readout, config.loss)


def _metakernels(backend: str) -> Contestant:
    def meta_step(problem: MetaProblem) -> MetaGrad:
        params, batch = problem.params, problem.batch
        out = metakernels.fast_weight_unroll(
            params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
            steps=problem.steps, loss=problem.config.loss, bias=params.get("bias"),
            queries=batch.get("readout_queries"), backend=backend)
        fast = {"weight": out.weight}
        if out.bias is not None:
            fast["bias"] = out.bias
        meta_loss = outer_loss(batch, fast, out.readout, problem.config.loss)
        return dict(zip(params, torch.autograd.grad(meta_loss, tuple(params.values()))))
    meta_step.__name__ = f"metakernels_{backend}"
    return meta_step


def _metakernels_loss(backend: str) -> Contestant:
    """``metakernels:<backend>+loss``: the whole meta-step in one op,
    :func:`metakernels.fast_weight_meta_loss` (the outer loss summed over tasks)."""
    def meta_step(problem: MetaProblem) -> MetaGrad:
        params, batch = problem.params, problem.batch
        readout = "readout_queries" in batch
        meta_loss = metakernels.fast_weight_meta_loss(
            params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
            batch["readout_queries" if readout else "query_x"],
            batch["readout_y" if readout else "query_y"], steps=problem.steps,
            loss=problem.config.loss, bias=params.get("bias"), reduction="sum", backend=backend)
        return dict(zip(params, torch.autograd.grad(meta_loss, tuple(params.values()))))
    meta_step.__name__ = f"metakernels_{backend}_loss"
    return meta_step


def torch_func(problem: MetaProblem) -> MetaGrad:
    loss = problem.config.loss

    def inner_loss(fast, x_t, y_t):
        return mean_loss(model(x_t, fast), y_t, loss)

    inner_grad = torch.func.grad(inner_loss)

    def task_outer_loss(fast, task_batch):
        return unrolled_outer_loss(fast, task_batch, problem, inner_grad)

    # A shared init is not batched over tasks; a per-task init is.
    param_dims = {name: None if problem.config.shared_init else 0 for name in problem.params}

    def meta_loss(params):
        per_task = torch.func.vmap(task_outer_loss, in_dims=(param_dims, 0))(params,
                                                                             problem.batch)
        return per_task.sum()

    return torch.func.grad(meta_loss)(problem.params)


def autograd_loop(problem: MetaProblem) -> MetaGrad:
    loss, tasks = problem.config.loss, problem.config.tasks

    def inner_grad(fast, x_t, y_t):
        # The tasks are independent, so the gradient of their summed losses is each task's own.
        inner_loss = mean_loss(model(x_t, fast), y_t, loss)
        grads = torch.autograd.grad(inner_loss, tuple(fast.values()), create_graph=True)
        return dict(zip(fast, grads))

    # Per-task fast weights from the start (a shared init broadcast, not copied), so the
    # inner gradients below are per task.
    fast = {name: p.expand(tasks, *p.shape) if problem.config.shared_init else p
            for name, p in problem.params.items()}
    meta_loss = unrolled_outer_loss(fast, problem.batch, problem, inner_grad)
    params = problem.params
    return dict(zip(params, torch.autograd.grad(meta_loss, tuple(params.values()))))


def contestant_names(device: str | torch.device = "cpu") -> list[str]:
    """Every contestant that can run on ``device``: the metakernels backends, fastest first,
    then the baselines."""
    backends = metakernels.available_backends(device)
    return ([f"metakernels:{b}" for b in backends]
            + [f"metakernels:{b}+loss" for b in backends if b != "reference"] + list(BASELINES))


def get_contestant(name: str) -> Contestant:
    """The contestant called ``name`` (see :func:`contestant_names`; the optional peers of
    :mod:`metakernels.benchmarks.peers` too)."""
    if name.startswith("metakernels:") and name.endswith("+loss"):
        return _metakernels_loss(name.split(":", 1)[1][:-len("+loss")])
    if name.startswith("metakernels:"):
        return _metakernels(name.split(":", 1)[1])
    if name == "torch.func":
        return torch_func
    if name == "autograd-loop":
        return autograd_loop
    if name in peers.PEERS:
        return peers.PEERS[name].meta_step
    raise ValueError(f"unknown contestant {name!r}; expected metakernels:<backend>, "
                     f"{', '.join(BASELINES + tuple(peers.PEERS))}")
