"""The meta-objective every contestant computes (see :mod:`metakernels.benchmarks.contestants`):
the linear model, the inputs of inner step t, the outer loss. The contestants and the optional
peers (:mod:`metakernels.benchmarks.peers`) both build on it; it knows neither."""

from __future__ import annotations

from torch import Tensor

from metakernels._losses import mean_loss
from metakernels.benchmarks.configs import MetaProblem

MetaGrad = dict[str, Tensor]


def model(x: Tensor, fast: dict[str, Tensor]) -> Tensor:
    """The linear model ``x W + 1 bᵀ``: x ``[..., rows, d_in]`` -> ``[..., rows, d_out]``."""
    logits = x @ fast["weight"]
    if "bias" in fast:
        logits = logits + fast["bias"].unsqueeze(-2)
    return logits


def outer_loss(batch: dict[str, Tensor], fast: dict[str, Tensor], readout: Tensor | None,
               loss: str) -> Tensor:
    """The meta-objective: the readout's loss (``[..., T, m, d_out]``) when the problem has one,
    else the adapted model's loss on the query set."""
    if "readout_y" in batch:
        return mean_loss(readout, batch["readout_y"], loss)
    return mean_loss(model(batch["query_x"], fast), batch["query_y"], loss)


def step_inputs(batch: dict[str, Tensor], problem: MetaProblem,
                t: int) -> tuple[Tensor, Tensor, float | Tensor]:
    """Step t's support rows, targets and inner lr, for a batch with or without the leading
    ``[B]``."""
    config = problem.config
    x_t, y_t = batch["support_x"], batch["support_y"]
    if config.x_per_step:
        # T's place counted from the right (-3 for x and mse targets, -2 for ce labels), so
        # the same code serves [B, T, n, d_in] and, inside vmap, [T, n, d_in].
        x_t = x_t.select(-3, t)
        y_t = y_t.select(-3 if config.loss == "mse" else -2, t)
    inner_lr = problem.inner_lr[t] if isinstance(problem.inner_lr, Tensor) else problem.inner_lr
    return x_t, y_t, inner_lr
