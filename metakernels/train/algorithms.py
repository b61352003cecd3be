"""The meta-learning algorithms: what one meta-step computes, and the held-out evaluation.

| algo    | inner loop                        | meta-gradient                                    |
|---------|-----------------------------------|--------------------------------------------------|
| maml    | T steps from the init             | exact second order                               |
| fomaml  | the same                          | first order (no gradient through the inner grads) |
| metasgd | learned per-step lr and lr_scale  | exact second order                               |
| anil    | the head only (the fused op)      | exact second order; the body by the outer loop    |
| reptile | T steps from the init             | the displacement init − adapted, averaged         |

With ``--adapt head`` (the default) only the linear head adapts and the inner loop is one call of
:func:`metakernels.fast_weight_unroll`; the body is trained by the outer loop through the
features. ``maml --adapt head`` is therefore the same computation as ``anil``, which is
MAML restricted to the head (Raghu et al. 2020); ``anil`` only refuses ``--adapt all``. With
``--adapt all`` every parameter adapts inside :func:`metakernels.fast_weight_mlp_unroll` (body and
head as one ReLU perceptron); ``--adapt all-generic`` through ``torch.func`` (``vmap`` over tasks
of an unrolled loop), for comparison. Reptile with ``--adapt head``: the head moves towards its adapted weights, and the body,
which does not adapt, takes the first-order gradient of the query loss at the adapted head.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from metakernels.train.tasks.base import TaskBatch

FIRST_ORDER = {"maml": False, "fomaml": True, "metasgd": False, "anil": False, "reptile": True}
# The algorithms whose head-only meta-step is fast_weight_meta_loss (HeadModel.meta_losses).
FUSED_META_LOSS = ("maml", "fomaml", "metasgd", "anil")


class StepStats(NamedTuple):
    """Sums over the tasks of one rank's shard (divide by the global batch for means)."""

    outer_loss: Tensor        # the query loss after adaptation
    inner_loss_first: Tensor  # the inner loss before the first inner step
    inner_loss_last: Tensor   # the inner loss before the last inner step
    accuracy: Tensor | None   # query accuracy after adaptation (classification)


def meta_step(model: nn.Module, batch: TaskBatch, algo: str, steps: int,
              global_tasks: int) -> StepStats:
    """Leaves in every parameter's ``.grad`` this shard's part of the meta-gradient of the mean
    query loss over ``global_tasks`` tasks (Reptile: of its displacement), and returns the
    shard's summed statistics."""
    if algo in FUSED_META_LOSS and getattr(model, "adapt", None) == "head" \
            and hasattr(model, "meta_losses"):
        # The head-only meta-step of these algorithms is the fused meta-loss op's: the query loss
        # and its meta-gradient in one op, no adapted head in PyTorch (the same gradients).
        per_task, accuracy, inner = model.meta_losses(batch, steps, FIRST_ORDER[algo])
        (per_task.sum() / global_tasks).backward()
        return StepStats(per_task.detach().sum(), inner[:, 0].sum(), inner[:, -1].sum(),
                         None if accuracy is None else accuracy.sum())
    reptile_all = algo == "reptile" and getattr(model, "adapt", "head") != "head"
    with torch.no_grad() if reptile_all else contextlib.nullcontext():
        adapted = model.inner_loop(batch, steps, FIRST_ORDER[algo])
        per_task, accuracy = model.query_losses(adapted.pred, batch)
    if not reptile_all:
        (per_task.sum() / global_tasks).backward()
    if algo == "reptile":
        params = dict(model.named_parameters())
        for name, fast in adapted.fast.items():
            param = params[name]
            param.grad = (param.detach() - fast.detach()).sum(0) / global_tasks
    inner = adapted.inner_losses.detach()
    return StepStats(per_task.detach().sum(), inner[:, 0].sum(), inner[:, -1].sum(),
                     None if accuracy is None else accuracy.detach().sum())


class Evaluation(NamedTuple):
    """Means over the held-out tasks."""

    query_loss_before_adapt: float
    query_loss_after_adapt: float
    query_accuracy_after_adapt: float | None
    inner_curve: list[float]   # the inner (support) loss before each inner step


def evaluate(model: nn.Module, task, tasks: int, batch_size: int, steps: int,
             generator: torch.Generator, device: torch.device) -> Evaluation:
    """The meta-init before and after adaptation on ``tasks`` held-out tasks (the task's test
    split), in batches of ``batch_size``."""
    before, after, accuracy, curve = [], [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, tasks, batch_size):
            batch = to_device(task.sample(min(batch_size, tasks - start), generator, "test"),
                              device)
            before.append(model.query_losses(model.unadapted(batch), batch)[0])
            adapted = model.inner_loop(batch, steps, True)
            loss, acc = model.query_losses(adapted.pred, batch)
            after.append(loss)
            curve.append(adapted.inner_losses)
            if acc is not None:
                accuracy.append(acc)
    model.train()
    return Evaluation(torch.cat(before).mean().item(), torch.cat(after).mean().item(),
                      torch.cat(accuracy).mean().item() if accuracy else None,
                      torch.cat(curve).mean(0).tolist())


def to_device(batch: TaskBatch, device: torch.device) -> TaskBatch:
    return {k: v.to(device) for k, v in batch.items()}


def shard(batch: TaskBatch, rank: int, world: int) -> TaskBatch:
    """This rank's contiguous share of the tasks."""
    return {k: v.tensor_split(world)[rank] for k, v in batch.items()}
