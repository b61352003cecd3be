"""The implicit inner loop on the ``walk`` task: a small causal LM trained as the RaML paper's
models are, by supervised fine-tuning on question + trajectory + answer, and the measurements of
:mod:`metakernels.analysis` on it.

The model is a GPT-2 (or Llama) built from a ``transformers`` config, random init, never loaded
from a hub. Every training batch mixes, half and half (``early_exit``):

- whole sequences ``prompt  trajectory  A: r_S <eos>`` (loss on the trajectory and the answer;
  the question's symbols are random, so they are not scored);
- early-exit copies: the trajectory cut after a uniformly drawn number of entries (0 … all), then
  ``A: r_S <eos>`` (loss on the answer and <eos> only). A model this small has never learned to
  answer early; these copies are the laptop-scale stand-in for a pretrained LLM's ability to
  answer at any point of its reasoning.

With ``trajectory=False`` a sequence is ``prompt A: r_S <eos>``. With ``questions=None`` every step
draws fresh questions with the canonical trajectory; with ``questions=N`` the model trains on a
fixed set of N questions with ``trajectories=K`` distinct groupings each
(:func:`~metakernels.train.tasks.walk_data.sample_groupings`), drawn uniformly per example.

:func:`train_lm` follows the trainer's conventions: a progress bar, ``metrics.jsonl``, an atomic
``checkpoint.pt`` and ``--resume``-style continuation (``resume=True``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from metakernels.train import checkpoint
from metakernels.train.loop import _read_metrics
from metakernels.train.tasks import walk_data as wd

CHECKPOINT, METRICS, SUMMARY = "checkpoint.pt", "metrics.jsonl", "summary.json"
ARCHITECTURES = ("gpt2", "llama")
TRANSFORMERS_HINT = ("the walk task's causal LM needs the transformers package: "
                     "pip install 'metakernels[train]' (or pip install transformers)")
# Settings that define a run: a resumed run must agree with its checkpoint on each.
RUN_FIELDS = ("group", "length", "trajectory", "questions", "trajectories", "early_exit",
              "arch", "width", "layers", "heads", "batch", "lr", "warmup", "seed")


@dataclasses.dataclass
class WalkLMConfig:
    """One causal-LM run on the walk task (see the module docstring)."""

    out: str
    steps: int = 3000
    group: str = "S3"
    length: int = 12
    trajectory: bool = True
    questions: int | None = None
    trajectories: int = 1
    early_exit: float = 0.5
    arch: str = "gpt2"
    width: int = 64
    layers: int = 2
    heads: int = 4
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    resume: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    progress: bool = True
    threads: int | None = 1

    def check(self) -> None:
        for name in ("steps", "length", "trajectories", "width", "layers", "heads", "batch",
                     "log_every", "checkpoint_every"):
            wd._positive_int(name, getattr(self, name))
        if self.questions is not None:
            wd._positive_int("questions", self.questions)
        if self.group not in wd.GROUPS:
            raise ValueError(f"group must be one of {', '.join(wd.GROUPS)}, got {self.group!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if not 0 <= self.early_exit <= 1:
            raise ValueError(f"early_exit must be in [0, 1], got {self.early_exit}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if self.trajectories > 1 and self.questions is None:
            raise ValueError("trajectories > 1 needs a fixed set of questions (questions=N): "
                             "with fresh questions every step there is nothing to repeat")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of heads={self.heads}")


def max_sequence(length: int) -> int:
    """Tokens of the longest training sequence: prompt, canonical trajectory, answer."""
    return length + 3 + wd.ENTRY_TOKENS * length + 3


def build_lm(vocab: wd.Vocabulary, config: WalkLMConfig):
    """A random-init causal LM over the task's vocabulary, with SDPA attention (which reads the
    custom 4-D masks of :func:`metakernels.analysis.answer_loss_curve`)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(TRANSFORMERS_HINT) from error
    positions = max_sequence(vocab.max_length) + 8
    if config.arch == "gpt2":
        lm_config = transformers.GPT2Config(
            vocab_size=vocab.size, n_positions=positions, n_embd=config.width,
            n_layer=config.layers, n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=wd.BOS, eos_token_id=wd.EOS, pad_token_id=wd.PAD)
        cls = transformers.GPT2LMHeadModel
    else:
        lm_config = transformers.LlamaConfig(
            vocab_size=vocab.size, max_position_embeddings=positions, hidden_size=config.width,
            intermediate_size=4 * config.width, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, num_key_value_heads=config.heads,
            bos_token_id=wd.BOS, eos_token_id=wd.EOS, pad_token_id=wd.PAD)
        cls = transformers.LlamaForCausalLM
    lm_config._attn_implementation = "sdpa"
    return cls(lm_config)


class QuestionPool:
    """Where training questions come from: fresh ones (``questions=None``, canonical trajectory),
    or a fixed set of N with K groupings each."""

    def __init__(self, config: WalkLMConfig, vocab: wd.Vocabulary,
                 generator: torch.Generator) -> None:
        self.config, self.vocab = config, vocab
        self.fixed = None
        if config.questions is not None:
            self.fixed = wd.sample_questions(config.questions, config.length,
                                             group_name=config.group, generator=generator)
            self.groupings = [wd.sample_groupings(config.length, config.trajectories,
                                                  generator=generator)
                              for _ in range(config.questions)]

    def draw(self, count: int, generator: torch.Generator):
        """``(WalkBatch, groupings)``: count questions and the grouping each is written with."""
        if self.fixed is None:
            batch = wd.sample_questions(count, self.config.length, group_name=self.config.group,
                                        generator=generator)
            return batch, [tuple(range(1, self.config.length + 1))] * count
        index = torch.randint(0, self.config.questions, (count,), generator=generator)
        which = torch.randint(0, self.config.trajectories, (count,), generator=generator)
        batch = wd.WalkBatch(*(t[index] for t in (self.fixed.symbols, self.fixed.states,
                                                  self.fixed.positions)))
        return batch, [self.groupings[i][w] for i, w in zip(index.tolist(), which.tolist())]


def training_batch(vocab: wd.Vocabulary, batch: wd.WalkBatch, groupings, *, trajectory: bool,
                   early: Tensor, cuts: Tensor) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, L], scored [B, L])``: right-padded sequences and which of their tokens are
    predicted in the loss. ``early [B]`` bool marks early-exit copies, cut after ``cuts [B]``
    entries of their grouping."""
    prompts = wd.prompt_ids(vocab, batch)
    entries = wd.entry_ids(vocab, batch)
    answers = wd.answer_token(vocab, batch.answer)
    rows, flags = [], []
    for i in range(prompts.shape[0]):
        steps = list(groupings[i]) if trajectory else []
        if trajectory and bool(early[i]):
            steps = steps[:int(cuts[i])]
        written = entries[i, [k - 1 for k in steps]].reshape(-1)
        tail = torch.tensor([wd.ANSWER, int(answers[i]), wd.EOS])
        rows.append(torch.cat([prompts[i], written, tail]))
        score_trajectory = trajectory and not bool(early[i])
        flags.append(torch.cat([torch.zeros(prompts.shape[1], dtype=torch.bool),
                                torch.full((written.numel(),), score_trajectory),
                                torch.tensor([score_trajectory or not trajectory, True, True])]))
    longest = max(r.numel() for r in rows)
    ids = torch.full((len(rows), longest), wd.PAD, dtype=torch.int64)
    scored = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, (r, f) in enumerate(zip(rows, flags)):
        ids[i, :r.numel()], scored[i, :r.numel()] = r, f
    return ids, scored


def lm_loss(model, ids: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
    """The mean cross-entropy over the scored tokens, and the accuracy of the answer tokens
    (the token after ``A:``)."""
    logits = model(input_ids=ids).logits[:, :-1]
    targets, mask = ids[:, 1:], scored[:, 1:]
    loss = F.cross_entropy(logits[mask], targets[mask])
    after_marker = (ids[:, :-1] == wd.ANSWER)
    accuracy = (logits.argmax(-1) == targets)[after_marker].float().mean()
    return loss, accuracy


def train_lm(config: WalkLMConfig) -> dict:
    """Trains up to ``config.steps`` steps (continuing a checkpoint with ``resume``); writes
    ``metrics.jsonl`` (``{"step", "loss", "answer_accuracy", "seconds"}`` every ``log_every``),
    ``checkpoint.pt`` (atomic, every ``checkpoint_every`` and at the end) and ``summary.json``.
    Returns the summary."""
    config.check()
    out = Path(config.out)
    path = out / CHECKPOINT
    saved = checkpoint.load_for_resume(path, config.resume)
    if saved is not None:
        for name in RUN_FIELDS:
            if saved["config"][name] != getattr(config, name):
                raise ValueError(f"resume: the run in {out} has {name}={saved['config'][name]!r}, "
                                 f"this one asks for {getattr(config, name)!r}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, saved)
    finally:
        torch.set_num_threads(threads)


def _train(config: WalkLMConfig, saved: dict | None) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = wd.Vocabulary(config.group, config.length)
    torch.manual_seed(config.seed)
    model = build_lm(vocab, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup)))
    generator = torch.Generator().manual_seed(config.seed)
    pool = QuestionPool(config, vocab, torch.Generator().manual_seed(config.seed + 1))
    start, seconds = 0, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        start, seconds = saved["step"], saved["seconds"]
    metrics = out / METRICS
    # Lines past the checkpoint (a crash after logging) are replayed by the resumed run.
    kept = _read_metrics(metrics, start) if saved is not None else []
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def save(step: int) -> None:
        checkpoint.save_atomic({"step": step, "config": dataclasses.asdict(config),
                                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict(),
                                "generator": generator.get_state(),
                                "torch_rng": torch.get_rng_state(), "seconds": seconds},
                               out / CHECKPOINT)

    model.train()
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress, unit="step",
               desc=f"walk-lm {config.group} S={config.length}", dynamic_ncols=True)
    try:
        with open(metrics, "a") as log:
            for step in range(start + 1, config.steps + 1):
                began = time.perf_counter()
                batch, groupings = pool.draw(config.batch, generator)
                early = torch.rand(config.batch, generator=generator) < config.early_exit
                lengths = torch.tensor([len(g) for g in groupings])
                cuts = (torch.rand(config.batch, generator=generator) * (lengths + 1)).long()
                ids, scored = training_batch(vocab, batch, groupings,
                                             trajectory=config.trajectory, early=early, cuts=cuts)
                loss, accuracy = lm_loss(model, ids, scored)
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"non-finite loss at step {step}; the last checkpoint is "
                                       f"kept in {out / CHECKPOINT}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                seconds += time.perf_counter() - began
                if step % config.log_every == 0 or step == config.steps:
                    log.write(json.dumps({"step": step, "loss": loss.item(),
                                          "answer_accuracy": accuracy.item(),
                                          "seconds": seconds}) + "\n")
                    log.flush()
                if step % config.checkpoint_every == 0 or step == config.steps:
                    save(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    finally:
        bar.close()
    summary = {"config": dataclasses.asdict(config), "steps": config.steps,
               "train_seconds": seconds, "seconds_per_step": seconds / max(1, config.steps)}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_lm(run: str | Path):
    """``(model in eval mode, vocabulary, config)`` of a trained run."""
    saved = checkpoint.load(Path(run) / CHECKPOINT)
    config = WalkLMConfig(**{**saved["config"], "out": str(run)})
    vocab = wd.Vocabulary(config.group, config.length)
    model = build_lm(vocab, config)
    model.load_state_dict(saved["model"])
    model.eval()
    return model, vocab, config


# ---------------------------------------------------------------- measurements

def held_out(config: WalkLMConfig, questions: int, seed: int) -> wd.WalkBatch:
    return wd.sample_questions(questions, config.length, group_name=config.group,
                               generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def answer_loss_curves(model, vocab: wd.Vocabulary, batch: wd.WalkBatch,
                       states: wd.WalkBatch | None = None) -> Tensor:
    """``[B, S + 1]``: L̂ after 0 … S entries of the canonical trajectory (of ``states``, e.g. a
    corrupted walk, default the true one), each question in one batched pass of
    :func:`metakernels.analysis.answer_loss_curve`; the answer is always the TRUE r_S."""
    from metakernels.analysis import answer_loss_curve
    states = batch if states is None else states
    prompts, entries = wd.prompt_ids(vocab, batch), wd.entry_ids(vocab, states)
    answers = wd.answer_token(vocab, batch.answer)
    cuts = torch.arange(0, batch.length + 1) * wd.ENTRY_TOKENS
    marker = torch.tensor([wd.ANSWER])
    return torch.stack([answer_loss_curve(model, prompts[i], entries[i].reshape(-1),
                                          answers[i:i + 1], cuts, answer_prefix_ids=marker)
                        for i in range(prompts.shape[0])])


@torch.no_grad()
def final_answer(model, vocab: wd.Vocabulary, batch: wd.WalkBatch, *,
                 trajectory: bool) -> tuple[Tensor, Tensor]:
    """``(loss [B], correct [B])`` of the answer after ``prompt  trajectory  A:`` (the whole true
    canonical trajectory given, teacher-forced) or after ``prompt A:`` (``trajectory=False``):
    its cross-entropy and whether the most likely position is r_S."""
    prompts = wd.prompt_ids(vocab, batch)
    parts = [prompts]
    if trajectory:
        parts.append(wd.entry_ids(vocab, batch).flatten(1))
    ids = torch.cat(parts + [torch.full((prompts.shape[0], 1), wd.ANSWER)], 1)
    logits = model(input_ids=ids).logits[:, -1]
    target = wd.answer_token(vocab, batch.answer)
    return F.cross_entropy(logits, target, reduction="none"), logits.argmax(-1) == target


@torch.no_grad()
def generate_answers(model, vocab: wd.Vocabulary, batch: wd.WalkBatch, *, samples: int = 1,
                     sample: bool = False, chunk: int = 1024, seed: int = 0) -> Tensor:
    """``[B, samples]`` the position each generation answers (the token after its first ``A:``),
    or a value outside [−S, S] where it wrote none: the model writes its own trajectory from the
    prompt, greedily or sampled at temperature 1 (no top-k, no top-p)."""
    prompts = wd.prompt_ids(vocab, batch).repeat_interleave(samples, 0)
    new = wd.ENTRY_TOKENS * batch.length + 3
    invalid = 10 * vocab.max_length
    torch.manual_seed(seed)
    answers = []
    for start in range(0, prompts.shape[0], chunk):
        ids = prompts[start:start + chunk]
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
            do_sample=sample, temperature=1.0 if sample else None, top_k=0 if sample else None,
            top_p=1.0 if sample else None, pad_token_id=wd.PAD, eos_token_id=wd.EOS)
        tail = generated[:, ids.shape[1]:]
        is_marker = (tail == wd.ANSWER)
        has = is_marker.any(1)
        first = is_marker.float().argmax(1)
        after = tail.gather(1, (first + 1).clamp(max=tail.shape[1] - 1)[:, None])[:, 0]
        value = after - vocab.position0
        ok = has & (first + 1 < tail.shape[1]) & (value.abs() <= vocab.max_length)
        answers.append(torch.where(ok, value, invalid))
    return torch.cat(answers).reshape(batch.symbols.shape[0], samples)


def pass_curves(correct: Tensor, ks) -> tuple[dict, dict]:
    """Mean Pass@k and mG-Pass@k over questions from ``correct [B, n]`` bool samples."""
    from metakernels.analysis import mg_pass_at_k, pass_at_k
    n = correct.shape[1]
    counts = correct.sum(1).tolist()
    passes = {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}
    mg = {str(k): sum(mg_pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}
    return passes, mg
