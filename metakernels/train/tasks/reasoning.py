"""Reasoning as meta-learning: every question is a task, and its chain-of-thought trajectory is
the inner loop that adapts the model, one step per chunk, until it can answer.

Questions are arithmetic chains modulo 10 (:mod:`metakernels.train.tasks.reasoning_data`); a
trajectory restates every step, ``r op d = r' ;`` (6 tokens). The model:

- a tiny GPT-2 built locally from a ``transformers`` config (2 layers, width 64, random init,
  the task's vocabulary of a few dozen tokens; never loaded from a hub) encodes the question, and
  every trajectory step after the question (the step's tokens attend to the question and to
  themselves, at the positions they have in the full sequence);
- a :class:`~metakernels.nn.FastWeightMemory` reads the encoded trajectory chunk by chunk: chunk
  t holds step t of each of the question's K trajectories (the support set), and is one inner
  step of the fused op (``chunk_size = 6 K``);
- the answer is read out of the adapted fast weights: the question's last hidden state h gives a
  query q, and the answer logits are ``head(h + out(q W_T + b_T))`` over the 10 digits. With
  ``--no-trajectory`` there is no inner loop: the readout uses the meta-init ``(W_0, b_0)``.

The outer loss is the answer's cross-entropy; ``query_loss_before_adapt`` is the answer read
from the meta-init (no chunk read), ``query_loss_after_adapt`` after the whole trajectory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metakernels import _attention, _extras
from metakernels.nn import FastWeightMemory
from metakernels.train.models import Adapted
from metakernels.train.tasks import reasoning_data as data
from metakernels.train.tasks.base import Defaults, Task, TaskBatch, query_losses

WIDTH, LAYERS, HEADS, KEY_WIDTH = 64, 2, 4, 32


class Reasoning(Task):
    name = "reasoning"
    loss = "ce"
    # inner_steps is the trajectory's length (one inner step per chunk); inner_lr is the memory's
    # initial inner learning rate.
    defaults = Defaults(meta_batch=32, inner_steps=None, inner_lr=1.0, meta_lr=3e-3,
                        eval_tasks=1000)
    option_defaults = {"trajectories": 1, "trajectory_length": 4, "no_trajectory": False,
                       "answer_every_step": False}
    rejected_algorithms = {
        "reptile": "Reptile moves the init towards the weights adapted on the trajectory and "
                   "never looks at the answer, so nothing would learn to read the answer out",
    }
    rejects_adapt_all = ("the inner loop of a question is the fast-weight memory reading its "
                         "trajectory; adapting the whole transformer per chunk is another model")

    def configure(self, config) -> None:
        if config.inner_steps is not None:
            raise ValueError("--inner-steps does not apply to --task reasoning: the memory takes "
                             "one inner step per trajectory chunk; set --trajectory-length")
        self.trajectories = config.trajectories
        self.length = config.trajectory_length
        self.no_trajectory = config.no_trajectory

    def sample(self, tasks: int, generator: torch.Generator, split: str) -> TaskBatch:
        # Questions are drawn fresh: held-out ones come from the evaluation's own generator.
        batch = data.sample_questions(tasks, self.length, generator=generator,
                                      trajectories=self.trajectories,
                                      with_trajectory=not self.no_trajectory)
        return {"prompt_ids": batch.prompt_ids, "trajectory_ids": batch.trajectory_ids,
                "answer": batch.answer}

    def sample_with_corruption(self, tasks: int, generator: torch.Generator
                               ) -> tuple[TaskBatch, TaskBatch]:
        """The same questions twice: with their correct trajectories, and with one step made
        wrong (the same step in each of a question's trajectories) and the error propagated."""
        correct = self.sample(tasks, generator, "test")
        step = torch.randint(0, self.length, (tasks, 1), generator=generator)
        wrong, _ = data.corrupt(correct["trajectory_ids"], generator=generator, step=step)
        return correct, dict(correct, trajectory_ids=wrong)

    def build_model(self, config) -> "ReasoningModel":
        _extras.require("--task reasoning", "transformers")
        from transformers import GPT2Model
        # Trained in the default dtype; the trajectory's block mask rules flash-attn out.
        attention, why = _attention.choose(GPT2Model, config.device, torch.get_default_dtype(),
                                           custom_mask=not config.no_trajectory)
        _attention.say_once("reasoning task's transformer", attention, why)
        return ReasoningModel(config.trajectories, config.trajectory_length, config.inner_lr,
                              attention=attention,
                              per_step_lr=config.algo == "metasgd",
                              learn_lr=config.algo == "metasgd",
                              first_order=config.algo == "fomaml",
                              answer_every_step=config.answer_every_step)


class ReasoningModel(nn.Module):
    """The question encoder, the fast-weight memory over the trajectory and the answer head.
    ``attention``: the encoder's attention implementation (``Reasoning.build_model`` passes the
    one ``metakernels._attention.choose`` picks for its device, dtype and mask)."""

    def __init__(self, trajectories: int, length: int, inner_lr: float, *,
                 per_step_lr: bool = False, learn_lr: bool = False,
                 first_order: bool = False, answer_every_step: bool = False,
                 attention: str = _attention.SDPA) -> None:
        super().__init__()
        _extras.require("--task reasoning", "transformers")
        from transformers import GPT2Config, GPT2Model
        prompt = 2 * length + 4
        config = GPT2Config(vocab_size=data.VOCAB_SIZE, n_positions=prompt + data.STEP_TOKENS
                            * length, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=data.BOS, eos_token_id=data.EOS,
                            pad_token_id=data.PAD, attn_implementation=attention)
        self.encoder = GPT2Model(config)
        self.memory = FastWeightMemory(WIDTH, KEY_WIDTH, chunk_size=data.STEP_TOKENS * trajectories,
                                       bias=True, max_chunks=length if per_step_lr else None,
                                       inner_lr=inner_lr, first_order=first_order)
        # maml, fomaml and anil adapt with a fixed inner lr (as the sinusoid and fewshot heads
        # do); metasgd learns one per step.
        self.memory.inner_lr_raw.requires_grad_(learn_lr)
        self.head = nn.Linear(WIDTH, 10)
        self.trajectories, self.length = trajectories, length
        self.answer_every_step = answer_every_step

    def encode(self, batch: TaskBatch) -> tuple[Tensor, Tensor | None]:
        """The question's last hidden state ``[B, d]`` and the trajectory's hidden states
        ``[B, S·K·6, d]`` in chunk order (step t of every trajectory together), or None."""
        prompt, steps = batch["prompt_ids"], batch["trajectory_ids"]   # [B, P], [B, K, S, 6]
        question = self.encoder(input_ids=prompt).last_hidden_state[:, -1]
        tasks, k, s, c = steps.shape
        if s == 0:
            return question, None
        # One sequence per (question, trajectory): the question, then the trajectory, in which
        # every step attends to the question and to itself only (a block mask), so each chunk is
        # encoded on its own, at the positions it has in the whole sequence.
        p = prompt.shape[1]
        ids = torch.cat([prompt[:, None].expand(tasks, k, p), steps.flatten(2)], -1)
        hidden = self.encoder(input_ids=ids.flatten(0, 1),
                              attention_mask=self._step_mask(p, s, c, prompt.device)
                              .expand(tasks * k, 1, -1, -1)).last_hidden_state[:, p:]
        hidden = hidden.reshape(tasks, k, s, c, -1).transpose(1, 2)   # [B, S, K, 6, d]
        return question, hidden.reshape(tasks, s * k * c, -1)

    def _step_mask(self, prompt: int, steps: int, chunk: int, device) -> Tensor:
        """``[1, 1, L, L]`` additive: causal, and a trajectory token sees the question and the
        tokens of its own step (transformers passes a 4-D float mask through unchanged)."""
        length = prompt + steps * chunk
        position = torch.arange(length, device=device)
        step = torch.where(position < prompt, -1, (position - prompt) // chunk)
        allowed = (position[None] <= position[:, None]) & (
            (step[None] == -1) | (step[None] == step[:, None]))
        dtype = self.head.weight.dtype
        mask = torch.zeros(length, length, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def answer_logits(self, question: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``[B, 10]`` read out of fast weights (``[B, d_key, d_value]``, ``[B, d_value]``, or the
        unbatched meta-init)."""
        query = F.normalize(self.memory.to_query(question), dim=-1) if \
            self.memory.normalize_keys else self.memory.to_query(question)
        read = (query.unsqueeze(-2) @ weight).squeeze(-2) + bias
        return self.head(question + self.memory.to_out(read))

    def inner_loop(self, batch: TaskBatch, steps=None, first_order=None) -> Adapted:
        """Reads every trajectory chunk by chunk (the memory's own ``first_order`` applies).
        ``pred`` is ``[B, 1, 10]``, the answer after the whole trajectory; while training with
        ``answer_every_step``, ``[B, S, 10]``, the answer after each prefix of 1 ... S chunks."""
        question, hidden = self.encode(batch)
        if hidden is None:
            logits = self.answer_logits(question, self.memory.init_weight, self.memory.init_bias)
            zeros = question.new_zeros(question.shape[0], 1)
            return Adapted(logits[:, None], zeros, {})
        _, state = self.memory(hidden, return_state=True)
        logits = self.answer_logits(question, state.weight, state.bias)[:, None]
        if self.answer_every_step and self.training:
            logits = torch.cat([self._prefix_logits(question, hidden, 1, self.length), logits], 1)
        return Adapted(logits, state.losses,
                       {"memory.init_weight": state.weight, "memory.init_bias": state.bias})

    def _prefix_logits(self, question: Tensor, hidden: Tensor, first: int, last: int) -> Tensor:
        """``[B, last − first, 10]``: the answer read out after ``first ... last − 1`` chunks
        (0: the meta-init)."""
        logits = []
        for read in range(first, last):
            if read == 0:
                logits.append(self.answer_logits(question, self.memory.init_weight,
                                                 self.memory.init_bias))
                continue
            _, state = self.memory(hidden[:, :read * self.memory.chunk_size], return_state=True)
            logits.append(self.answer_logits(question, state.weight, state.bias))
        return torch.stack(logits, 1)

    def unadapted(self, batch: TaskBatch) -> Tensor:
        question, _ = self.encode(dict(batch, trajectory_ids=batch["trajectory_ids"][:, :, :0]))
        return self.answer_logits(question, self.memory.init_weight,
                                  self.memory.init_bias)[:, None]

    def query_losses(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor | None]:
        """The answer's cross-entropy and accuracy ``[B]``, averaged over pred's readouts."""
        return query_losses(pred, batch["answer"][:, None].expand(-1, pred.shape[1]), "ce")

    def answer_loss_by_prefix(self, batch: TaskBatch) -> Tensor:
        """``[B, S + 1]``: the answer's cross-entropy read out after 0, 1, ..., S chunks."""
        question, hidden = self.encode(batch)
        logits = self._prefix_logits(question, hidden, 0, self.length + 1)   # [B, S + 1, 10]
        answer = batch["answer"][:, None].expand(-1, logits.shape[1])
        return F.cross_entropy(logits.transpose(1, 2), answer, reduction="none")
