"""Sinusoid regression (Finn et al. 2017, section 5.1): y = A sin(x − φ), amplitude A ~ U[0.1, 5],
phase φ ~ U[0, π], x ~ U[−5, 5], K = 10 support and 10 query points per task; the body is the MLP
1 → 40 → 40 (ReLU) and the head a linear 40 → 1."""

from __future__ import annotations

import math

import torch

from metakernels.train.models import head_model
from metakernels.train.tasks.base import Defaults, Task, TaskBatch

SUPPORT, QUERY = 10, 10


class Sinusoid(Task):
    name = "sinusoid"
    loss = "mse"
    # Finn et al. use inner steps of lr 0.01 on the whole network; the head alone on 40
    # meta-learned features takes larger steps. With every layer adapting, lr 0.1 over 5 steps
    # leaves a held-out query loss near 2.5 after 1500 meta-steps, lr 0.01 near 0.5
    # (seeds 0-2, both --adapt all and all-generic, 2026-12-07).
    defaults = Defaults(meta_batch=25, inner_steps=5, inner_lr=0.1, meta_lr=1e-3, eval_tasks=1000,
                        inner_lr_all=0.01)

    def sample(self, tasks: int, generator: torch.Generator, split: str) -> TaskBatch:
        # Regression tasks have no class split: held-out tasks are fresh draws (from the
        # evaluation's own generator).
        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(shape, generator=generator)

        amplitude = uniform(0.1, 5.0, tasks, 1, 1)
        phase = uniform(0.0, math.pi, tasks, 1, 1)
        x = uniform(-5.0, 5.0, tasks, SUPPORT + QUERY, 1)
        y = amplitude * torch.sin(x - phase)
        return {"support_x": x[:, :SUPPORT], "support_y": y[:, :SUPPORT],
                "query_x": x[:, SUPPORT:], "query_y": y[:, SUPPORT:]}

    def build_model(self, config):
        return head_model(config, [1, 40, 40], 1, self.loss)
