"""The optional peers: libraries a user would pick instead of metakernels, each computing the same
second-order meta-gradient as the contestants of :mod:`metakernels.benchmarks.contestants` (the
objective of :mod:`metakernels.benchmarks.objective`).

Installed by ``pip install 'metakernels[bench]'`` (``.[bench]`` in a checkout) where they install; a peer that is missing, or that cannot
run a configuration (device, dtype, model form), says why in :meth:`Peer.unavailable`, and the
suite prints that reason instead of a row.

- ``higher``: ``higher.innerloop_ctx`` around a linear module with a differentiable SGD.
- ``learn2learn``: ``learn2learn.algorithms.MAML(module).clone().adapt(loss)``.
- ``torchopt``: ``torchopt.MetaSGD`` stepping a linear module in place.
- ``fla:chunk_delta_rule``: flash-linear-attention's chunked delta-rule kernels (GPU, bf16/fp16),
  for the delta-rule form of docs/ops/fast_weight_unroll.md (n = 1, mse, no bias, a readout, 4-D x).

The module-based peers adapt one model per task, as their documentation does. With a per-task
init, the weights of all B tasks sit in one module (``[B, d_in, d_out]``): the inner loss summed
over tasks then has each task's own gradient, so one inner loop serves every task. With a shared
init the tasks must not share their inner gradient, so the peer loops over the tasks, each from
the same init, and sums their outer losses: how these libraries run MAML.

A per-step inner lr ``η_t`` is applied by stepping an lr-1 optimiser on ``η_t · ℓ_t``:
``θ − 1 · ∇(η_t ℓ_t) = θ − η_t ∇ℓ_t``, the same update, since these optimisers take one fixed lr.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from metakernels import _extras
from metakernels._losses import mean_loss
from metakernels.benchmarks.configs import BenchConfig, MetaProblem
from metakernels.benchmarks.objective import MetaGrad, model, outer_loss, step_inputs

HALF = (torch.bfloat16, torch.float16)


class _Linear(nn.Module):
    """``x W + 1 bᵀ`` with parameters that share storage with the problem's meta-parameters.
    ``weight`` is ``[d_in, d_out]`` or, for all tasks at once, ``[B, d_in, d_out]``."""

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value.detach()))

    def forward(self, x: Tensor) -> Tensor:
        return model(x, dict(self.named_parameters()))


def _task_batches(problem: MetaProblem) -> list[dict[str, Tensor]]:
    """The batch of every task (a shared init: one inner loop per task), or the whole batch once
    (a per-task init: one inner loop for all)."""
    if not problem.config.shared_init:
        return [problem.batch]
    return [{name: t[task] for name, t in problem.batch.items()}
            for task in range(problem.config.tasks)]


def _inner_lr(problem: MetaProblem) -> float:
    """The optimiser's own lr: the scalar inner lr, or 1 with η_t folded into the loss."""
    return 1.0 if isinstance(problem.inner_lr, Tensor) else problem.inner_lr


def _inner_loss(module: Callable[[Tensor], Tensor], batch: dict[str, Tensor],
                problem: MetaProblem, t: int) -> Tensor:
    """Step t's inner loss, scaled by η_t when the lr is per step (see the module docstring)."""
    x_t, y_t, inner_lr = step_inputs(batch, problem, t)
    loss = mean_loss(module(x_t), y_t, problem.config.loss)
    return inner_lr * loss if isinstance(problem.inner_lr, Tensor) else loss


def _unrolled(problem: MetaProblem, adapt: Callable, fast_params: Callable) -> MetaGrad:
    """The meta-gradient of a module-based peer.

    ``adapt(module, task_batch)`` starts an inner loop on ``module``: a context manager that
    gives ``(step, learner)``: ``step(loss)`` takes one differentiable step, ``learner(x)`` runs
    the adapted model, and ``fast_params(learner)`` gives its current ``{"weight", "bias"}``.
    """
    module = _Linear(problem.params)
    # The init, held before any peer replaces the module's parameters by updated values.
    init = tuple(module.parameters())
    total = 0
    for batch in _task_batches(problem):
        with adapt(module, batch) as (step, learner):
            readouts = []
            for t in range(problem.config.steps):
                step(_inner_loss(learner, batch, problem, t))
                if "readout_queries" in batch:
                    readouts.append(learner(batch["readout_queries"].select(-3, t)))
            readout = torch.stack(readouts, dim=-3) if readouts else None
            total = total + outer_loss(batch, fast_params(learner), readout,
                                       problem.config.loss)
    return dict(zip(problem.params, torch.autograd.grad(total, init)))


def _higher(problem: MetaProblem) -> MetaGrad:
    import higher

    @contextlib.contextmanager
    def adapt(module, batch):
        optimiser = torch.optim.SGD(module.parameters(), lr=_inner_lr(problem))
        with higher.innerloop_ctx(module, optimiser, copy_initial_weights=False) as (fmodel,
                                                                                   diffopt):
            yield diffopt.step, fmodel

    def fast_params(fmodel):
        return dict(zip(problem.params, fmodel.parameters()))
    return _unrolled(problem, adapt, fast_params)


def _learn2learn(problem: MetaProblem) -> MetaGrad:
    import learn2learn

    def adapt(module, batch):
        learner = learn2learn.algorithms.MAML(module, lr=_inner_lr(problem),
                                              first_order=False).clone()
        return contextlib.nullcontext((learner.adapt, learner))

    def fast_params(learner):
        return {name: getattr(learner.module, name) for name in problem.params}
    return _unrolled(problem, adapt, fast_params)


def _torchopt(problem: MetaProblem) -> MetaGrad:
    import torchopt

    def adapt(module, batch):
        # MetaSGD replaces the module's parameters by their updated (non-leaf) values in place;
        # put the initial ones back before the next task starts from the init.
        if hasattr(module, "initial_state"):
            torchopt.recover_state_dict(module, module.initial_state)
        else:
            module.initial_state = torchopt.extract_state_dict(module)
        return contextlib.nullcontext((torchopt.MetaSGD(module, lr=_inner_lr(problem)).step,
                                       module))

    def fast_params(module):
        return {name: getattr(module, name) for name in problem.params}
    return _unrolled(problem, adapt, fast_params)


def delta_rule_form(config: BenchConfig) -> str | None:
    """Why ``config`` is not the delta rule of docs/ops/fast_weight_unroll.md, or None when it
    is."""
    wanted = {"n = 1 support row per step": config.support == 1, "mse": config.loss == "mse",
              "no bias": not config.bias, "a readout of m = 1 row": config.queries == 1,
              "one batch per step (4-D x)": config.x_per_step}
    missing = [what for what, ok in wanted.items() if not ok]
    return f"not the delta-rule form (needs {', '.join(missing)})" if missing else None


def delta_rule_readout(problem: MetaProblem, chunk_delta_rule: Callable) -> Tensor:
    """The readout ``[B, T, 1, d_out]`` of the delta rule, through flash-linear-attention's
    ``chunk_delta_rule`` signature: ``W = Sᵀ`` is fla's state ``[B, H, K, V]`` with H = 1,
    ``β_t = η_t``, ``k_t = x_t``, ``v_t = y_t``, ``q_t`` the readout query, scale 1
    (docs/ops/fast_weight_unroll.md). The state is float32 as in metakernels; q, k, v, β take the
    problem's dtype."""
    config, batch = problem.config, problem.batch
    tasks, steps = config.tasks, config.steps
    weight = problem.params["weight"]
    q = batch["readout_queries"][:, :, 0].unsqueeze(2)      # [B, T, H=1, d_in]
    k = batch["support_x"][:, :, 0].unsqueeze(2)            # [B, T, 1, d_in]
    v = batch["support_y"][:, :, 0].unsqueeze(2)            # [B, T, 1, d_out]
    lr = problem.inner_lr
    lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, device=q.device)
    beta = lr.to(q.dtype).expand(tasks, steps).unsqueeze(-1).contiguous()  # [B, T, 1]
    state = weight.float().expand(tasks, config.d_in, config.d_out).unsqueeze(1)
    out, _ = chunk_delta_rule(q, k, v, beta, scale=1.0, initial_state=state,
                              output_final_state=False)
    return out.to(weight.dtype)                               # [B, T, 1, d_out]: m = 1


def _fla(problem: MetaProblem) -> MetaGrad:
    from fla.ops.delta_rule import chunk_delta_rule
    readout = delta_rule_readout(problem, chunk_delta_rule)
    meta_loss = outer_loss(problem.batch, {}, readout, problem.config.loss)
    return dict(zip(problem.params, torch.autograd.grad(meta_loss,
                                                        tuple(problem.params.values()))))


def _missing(module: str, note: str = "") -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({_extras.install_command('bench')}{note})"
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install is reported, not fatal
        return f"importing {module} failed: {type(error).__name__}: {error}"
    return None


@dataclass(frozen=True)
class Peer:
    """An optional contestant: its meta-step, and the package it needs."""

    name: str
    package: str
    meta_step: Callable[[MetaProblem], MetaGrad]
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] | None = None    # None: every dtype
    form: Callable[[BenchConfig], str | None] = lambda config: None
    install_note: str = ""

    def unavailable(self, config: BenchConfig, device: str | torch.device,
                    dtype: torch.dtype) -> str | None:
        """Why this peer cannot run ``config`` on ``device`` in ``dtype``; None when it can."""
        device_type = torch.device(device).type
        if device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} only"
        if self.dtypes is not None and dtype not in self.dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"runs {names} only"
        why = self.form(config)
        if why:
            return why
        return _missing(self.package, self.install_note)


PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    Peer("higher", "higher", _higher),
    Peer("learn2learn", "learn2learn", _learn2learn,
         install_note="; its 0.2.0 source release does not build on Python 3.11+: its "
                      "Cython-generated C includes longintrepr.h"),
    Peer("torchopt", "torchopt", _torchopt),
    Peer("fla:chunk_delta_rule", "fla", _fla, devices=("cuda",), dtypes=HALF,
         form=delta_rule_form),
)}
