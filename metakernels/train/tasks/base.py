"""What every task gives the trainer: batches of tasks, a model, defaults and the algorithms it
works with."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "reptile")

# A batch of tasks: every tensor has the task index first, so sharding across ranks is a split.
TaskBatch = dict[str, Tensor]


@dataclasses.dataclass(frozen=True)
class Defaults:
    """A task's default hyper-parameters (the command line can override each)."""

    meta_batch: int       # tasks per meta-step
    inner_steps: int      # T
    inner_lr: float       # η
    meta_lr: float        # Adam's learning rate in the outer loop
    eval_tasks: int       # held-out tasks in the final evaluation
    inner_lr_all: float | None = None   # η when every layer adapts (--adapt all, all-generic)


class Task:
    """A family of tasks.

    Subclasses set ``name``, ``loss`` (the inner and query loss, ``"mse"`` or ``"ce"``),
    ``defaults``, and the algorithms / adaptation modes they reject (with the reason), and
    implement :meth:`sample` and :meth:`build_model`.
    """

    name: ClassVar[str]
    loss: ClassVar[str]
    defaults: ClassVar[Defaults]
    # algorithm -> why it does not make sense for this task
    rejected_algorithms: ClassVar[dict[str, str]] = {}
    # reason "--adapt all" does not make sense, or None
    rejects_adapt_all: ClassVar[str | None] = None
    # the task's own settings (TrainConfig fields) and their defaults
    option_defaults: ClassVar[dict] = {}

    def check(self, algo: str, adapt: str) -> None:
        """Raises ValueError for a combination that does not make sense for this task."""
        if algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
        if adapt not in ("head", "all", "all-generic"):
            raise ValueError(f"adapt must be 'head', 'all' or 'all-generic', got {adapt!r}")
        if algo in self.rejected_algorithms:
            raise ValueError(f"--algo {algo} does not apply to --task {self.name}: "
                             f"{self.rejected_algorithms[algo]}")
        if adapt != "head" and self.rejects_adapt_all:
            raise ValueError(f"--adapt all does not apply to --task {self.name}: "
                             f"{self.rejects_adapt_all}")
        if adapt != "head" and algo == "anil":
            raise ValueError("--algo anil adapts only the head (ANIL: almost no inner loop); "
                             "use --adapt head, or --algo maml --adapt all for full MAML")

    def configure(self, config) -> None:
        """Takes the resolved settings (a TrainConfig) before sampling or building a model."""

    def sample(self, tasks: int, generator: torch.Generator, split: str) -> TaskBatch:
        """``tasks`` fresh tasks from ``split`` (``"train"`` or ``"test"``), drawn with
        ``generator`` on the CPU."""
        raise NotImplementedError

    def build_model(self, config) -> nn.Module:
        """The meta-model for a :class:`~metakernels.train.config.TrainConfig`."""
        raise NotImplementedError


def query_losses(pred: Tensor, target: Tensor, loss: str) -> tuple[Tensor, Tensor | None]:
    """Every task's query loss ``[B]`` and, for classification, its accuracy ``[B]``.

    pred ``[B, rows, d_out]``; target ``[B, rows, d_out]`` floats (mse: the mean squared error
    over the rows and outputs, as Finn et al. report it) or int64 labels ``[B, rows]`` (ce: the
    mean cross-entropy over the rows).
    """
    if loss == "mse":
        return (pred - target).pow(2).flatten(1).mean(1), None
    ce = nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(1)
    accuracy = (pred.argmax(-1) == target).to(pred.dtype).mean(1)
    return ce, accuracy
