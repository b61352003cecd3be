"""The trainer's tasks: ``sinusoid``, ``fewshot``, ``reasoning`` and ``walk``."""

from __future__ import annotations

from metakernels.train.tasks.base import ALGORITHMS, Defaults, Task, TaskBatch

TASKS = ("sinusoid", "fewshot", "reasoning", "walk")


def make_task(name: str) -> Task:
    """The task called ``name``."""
    if name == "sinusoid":
        from metakernels.train.tasks.sinusoid import Sinusoid
        return Sinusoid()
    if name == "fewshot":
        from metakernels.train.tasks.fewshot import FewShot
        return FewShot()
    if name == "reasoning":
        from metakernels.train.tasks.reasoning import Reasoning
        return Reasoning()
    if name == "walk":
        from metakernels.train.tasks.walk import Walk
        return Walk()
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")


__all__ = ["ALGORITHMS", "Defaults", "TASKS", "Task", "TaskBatch", "make_task"]
