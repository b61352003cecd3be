"""N-way K-shot classification on synthetic classes generated in code.

A fixed pool of classes (the same for every seed): each class is a Gaussian blob around a centre
in a 16-d latent space, seen through a fixed nonlinear map to 32-d inputs,
``x = tanh((centre + 0.5 ε) A)``. The first 64 classes are the meta-training split, the last 32
the meta-test split: evaluation uses classes never seen in training. A task picks N classes of
its split, labels them 0..N−1 in a random order, and draws K support and Q query points of each.
"""

from __future__ import annotations

import torch

from metakernels.train.models import head_model
from metakernels.train.tasks.base import Defaults, Task, TaskBatch

WAYS, SHOTS, QUERIES = 5, 5, 5
LATENT, INPUT, NOISE = 16, 32, 0.5
TRAIN_CLASSES, TEST_CLASSES = 64, 32
DATASET_SEED = 20170305   # the class pool is part of the task's definition, not of a run's seed


class FewShot(Task):
    name = "fewshot"
    loss = "ce"
    defaults = Defaults(meta_batch=16, inner_steps=5, inner_lr=0.5, meta_lr=1e-3, eval_tasks=400)

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(DATASET_SEED)
        self.centres = torch.randn(TRAIN_CLASSES + TEST_CLASSES, LATENT, generator=gen)
        self.projection = torch.randn(LATENT, INPUT, generator=gen) * LATENT ** -0.5

    def sample(self, tasks: int, generator: torch.Generator, split: str) -> TaskBatch:
        first, count = (0, TRAIN_CLASSES) if split == "train" else (TRAIN_CLASSES, TEST_CLASSES)
        classes = first + torch.rand(tasks, count, generator=generator).argsort(1)[:, :WAYS]
        per_class = SHOTS + QUERIES
        centres = self.centres[classes]                                   # [B, N, latent]
        noise = torch.randn(tasks, WAYS, per_class, LATENT, generator=generator)
        x = torch.tanh((centres[:, :, None] + NOISE * noise) @ self.projection)
        labels = torch.arange(WAYS).view(1, WAYS, 1).expand(tasks, WAYS, per_class)

        def rows(t):   # [B, N, k, ...] -> [B, N·k, ...]
            return t.flatten(1, 2)

        return {"support_x": rows(x[:, :, :SHOTS]), "support_y": rows(labels[:, :, :SHOTS]),
                "query_x": rows(x[:, :, SHOTS:]), "query_y": rows(labels[:, :, SHOTS:])}

    def build_model(self, config):
        return head_model(config, [INPUT, 64, 64], WAYS, self.loss)
