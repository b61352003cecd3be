"""The settings of one training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The settings that define a run: a resumed run must agree with its checkpoint on each of them.
RUN_FIELDS = ("task", "algo", "adapt", "seed", "meta_batch", "inner_steps", "inner_lr", "meta_lr",
              "eval_tasks", "trajectories", "trajectory_length", "no_trajectory",
              "answer_every_step")
# The settings that belong to one task (the reasoning task's).
TASK_OPTIONS = ("trajectories", "trajectory_length", "no_trajectory", "answer_every_step")


@dataclass
class TrainConfig:
    """One ``metakernels train`` run. ``None`` means the task's default (or, with ``resume``,
    the checkpoint's value).

    task, algo, adapt: what to train and how (see ``metakernels train --help``).
    steps:            the total number of meta-steps (a resumed run continues up to it).
    out:              the run's folder: metrics.jsonl, summary.json, checkpoint.pt, curves.png.
    seed:             the model's init and the stream of training tasks.
    resume:           continue from ``out/checkpoint.pt``.
    device:           where to train (``cpu``, ``cuda``, ``cuda:1``).
    meta_batch:       tasks per meta-step (the global batch, split across ranks).
    inner_steps:      T, inner steps per task (reasoning: set by the trajectory length).
    inner_lr:         η, the inner learning rate (its initial value where it is learned).
    meta_lr:          Adam's learning rate in the outer loop.
    eval_tasks:       held-out tasks in the final evaluation.
    log_every:        a metrics.jsonl line every this many steps (and at the last step).
    checkpoint_every: a checkpoint every this many steps (and at the last step).
    progress:         show a progress bar.
    threads:          ``torch.set_num_threads`` first (None: torch's choice). On a loaded
                      machine, intra-op threads waiting for a busy core slow small models a lot.
    trajectories:     reasoning: trajectories per question (the support-set size).
    trajectory_length: reasoning: steps of the arithmetic chain (and of its trajectory).
    no_trajectory:    reasoning: answer from the question alone (no inner loop on a trajectory).
    answer_every_step: reasoning: the outer loss is the answer's loss read out after every
                      prefix of the trajectory (1 ... S chunks), averaged, not only after all S.
    """

    task: str = "sinusoid"
    algo: str = "maml"
    steps: int = 1000
    out: str = "runs/train"
    seed: int | None = None
    resume: bool = False
    device: str = "cpu"
    adapt: str | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    meta_lr: float | None = None
    eval_tasks: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    progress: bool = True
    threads: int | None = None
    trajectories: int | None = None
    trajectory_length: int | None = None
    no_trajectory: bool | None = None
    answer_every_step: bool | None = None

    def run_settings(self) -> dict:
        return {name: getattr(self, name) for name in RUN_FIELDS}

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
