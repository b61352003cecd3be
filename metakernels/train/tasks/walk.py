"""The explicit inner loop on the ``walk`` task (:mod:`metakernels.train.tasks.walk_data`): the
trainer's :class:`~metakernels.nn.FastWeightMemory` reads the canonical trajectory one entry per
inner step of the fused op, and the answer r_S is read out of the adapted fast weights.

The model is the ``reasoning`` task's (:class:`~metakernels.train.tasks.reasoning.ReasoningModel`:
a 2-layer GPT-2 of width 64 encodes the question and every trajectory entry, the memory takes one
inner step per entry, the question's last hidden state queries the fast weights) with the walk's
vocabulary, entries of 4 tokens and an answer head over the 2S + 1 positions.

By default (``answer_every_step``, the walk task's default) the outer loss is the answer's
cross-entropy read out after every prefix of 0, 1, …, S entries, averaged: every prefix carries
information about the answer here, and the least loss after k entries is H_k
(:func:`~metakernels.train.tasks.walk_data.no_lookahead_entropy`). The group is S3 and the walk is
``--trajectory-length`` steps long (default 12); ``--trajectories`` must be 1 (a grouped
trajectory has fewer entries than the canonical one, so K of them do not share inner steps).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metakernels import _extras
from metakernels.nn import FastWeightMemory
from metakernels.train.models import Adapted
from metakernels.train.tasks import walk_data as wd
from metakernels.train.tasks.base import Defaults, TaskBatch
from metakernels.train.tasks.reasoning import KEY_WIDTH, WIDTH, Reasoning, ReasoningModel

GROUP = "S3"


class Walk(Reasoning):
    """The walk task; it refuses what the reasoning task refuses, for the same reasons."""

    name = "walk"
    # meta_lr 1e-3, not the reasoning task's 3e-3: with 3e-3 (and 1e-2) the every-step objective
    # sat at the prior (L̂ = H_0 after every prefix) for 400 steps; with 1e-3 it leaves it at once
    # (bench/results/raml/README.md).
    defaults = Defaults(meta_batch=32, inner_steps=None, inner_lr=1.0, meta_lr=1e-3,
                        eval_tasks=1000)
    option_defaults = {"trajectories": 1, "trajectory_length": 12, "no_trajectory": False,
                       "answer_every_step": True}

    def configure(self, config) -> None:
        if config.inner_steps is not None:
            raise ValueError("--inner-steps does not apply to --task walk: the memory takes one "
                             "inner step per trajectory entry; set --trajectory-length")
        if config.trajectories != 1:
            raise ValueError(f"--task walk reads one trajectory per question (--trajectories 1), "
                             f"got {config.trajectories}: the walk's other trajectories group "
                             "steps and have fewer entries, so they cannot share inner steps")
        self.length = config.trajectory_length
        self.no_trajectory = config.no_trajectory
        self.vocab = wd.Vocabulary(GROUP, self.length)

    def _batch(self, questions: wd.WalkBatch, states: wd.WalkBatch) -> TaskBatch:
        entries = wd.entry_ids(self.vocab, states)[:, None]            # [B, 1, S, 4]
        if self.no_trajectory:
            entries = entries[:, :, :0]
        return {"prompt_ids": wd.prompt_ids(self.vocab, questions), "trajectory_ids": entries,
                "answer": questions.answer + self.length}

    def sample(self, tasks: int, generator: torch.Generator, split: str) -> TaskBatch:
        questions = wd.sample_questions(tasks, self.length, group_name=GROUP, generator=generator)
        return self._batch(questions, questions)

    def sample_with_corruption(self, tasks: int, generator: torch.Generator
                               ) -> tuple[TaskBatch, TaskBatch]:
        """The same questions with their true trajectory, and with one state made wrong and the
        walk continued from it (:func:`walk_data.corrupt`); the answer stays the true r_S."""
        questions = wd.sample_questions(tasks, self.length, group_name=GROUP, generator=generator)
        wrong, _ = wd.corrupt(questions, GROUP, generator=generator)
        return self._batch(questions, questions), self._batch(questions, wrong)

    def build_model(self, config) -> "WalkModel":
        _extras.require("--task walk", "transformers")
        return WalkModel(self.vocab, config.trajectory_length, config.inner_lr,
                         per_step_lr=config.algo == "metasgd", learn_lr=config.algo == "metasgd",
                         first_order=config.algo == "fomaml",
                         answer_every_step=config.answer_every_step)


class WalkModel(ReasoningModel):
    """:class:`ReasoningModel` over the walk's vocabulary (its encoder's config, attention
    included, with the walk's vocabulary and length), entries of 4 tokens and 2S + 1 answers.
    With ``answer_every_step`` the training readouts are after 0, 1, …, S entries."""

    def __init__(self, vocab: wd.Vocabulary, length: int, inner_lr: float, *,
                 per_step_lr: bool = False, learn_lr: bool = False, first_order: bool = False,
                 answer_every_step: bool = True) -> None:
        super().__init__(1, length, inner_lr, per_step_lr=per_step_lr, learn_lr=learn_lr,
                         first_order=first_order, answer_every_step=answer_every_step)
        config = copy.deepcopy(self.encoder.config)
        config.vocab_size = vocab.size
        config.n_positions = length + 3 + wd.ENTRY_TOKENS * length
        config.bos_token_id, config.eos_token_id, config.pad_token_id = wd.BOS, wd.EOS, wd.PAD
        self.encoder = type(self.encoder)(config)
        self.memory = FastWeightMemory(WIDTH, KEY_WIDTH, chunk_size=wd.ENTRY_TOKENS, bias=True,
                                       max_chunks=length if per_step_lr else None,
                                       inner_lr=inner_lr, first_order=first_order)
        self.memory.inner_lr_raw.requires_grad_(learn_lr)
        self.head = nn.Linear(WIDTH, 2 * length + 1)

    def inner_loop(self, batch: TaskBatch, steps=None, first_order=None) -> Adapted:
        if not (self.answer_every_step and self.training) or batch["trajectory_ids"].shape[2] == 0:
            return super().inner_loop(batch, steps, first_order)
        question, hidden = self.encode(batch)
        _, state = self.memory(hidden, return_state=True)
        logits = self._every_prefix_logits(question, hidden)
        return Adapted(logits, state.losses,
                       {"memory.init_weight": state.weight, "memory.init_bias": state.bias})

    def _every_prefix_logits(self, question, hidden):
        """``[B, S + 1, 2S + 1]``: the answer read out of the meta-init and after every entry,
        the S readouts from one call of the fused op (:meth:`FastWeightMemory.read_every_chunk`)."""
        read = self.memory.read_every_chunk(hidden, question[:, None])[:, :, 0]   # [B, S, d_v]
        first = self.answer_logits(question, self.memory.init_weight, self.memory.init_bias)
        return torch.cat([first[:, None], self.head(question[:, None]
                                                    + self.memory.to_out(read))], 1)

    def answer_loss_by_prefix(self, batch: TaskBatch):
        """``[B, S + 1]``: the answer's cross-entropy read out after 0, 1, …, S entries."""
        question, hidden = self.encode(batch)
        logits = self._every_prefix_logits(question, hidden)
        answer = batch["answer"][:, None].expand(-1, logits.shape[1])
        return nn.functional.cross_entropy(logits.transpose(1, 2), answer, reduction="none")
