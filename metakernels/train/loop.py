"""The training loop: meta-steps, logging, checkpoints, resume, distributed data parallelism,
the held-out evaluation and the outputs of a run (see :func:`train`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from metakernels import _extras
from metakernels.train import checkpoint
from metakernels.train.algorithms import evaluate, meta_step, shard, to_device
from metakernels.train.config import RUN_FIELDS, TASK_OPTIONS, TrainConfig
from metakernels.train.tasks import make_task

# Held-out tasks come from their own stream, the same for every run, so runs compare.
EVAL_SEED = 2 ** 31 - 1
GENERIC_DEFAULTS = {"seed": 0, "adapt": "head"}
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"
SUMMARY, CURVES = "summary.json", "curves.png"


class NonFiniteLoss(RuntimeError):
    """The meta-loss or the meta-gradient stopped being finite; the run stopped before applying
    it, and the last checkpoint on disk is the last good one."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve(config: TrainConfig, task, saved: dict | None) -> TrainConfig:
    """Fills every unset (None) setting: from the checkpoint when resuming, else the task's and
    the trainer's defaults. A setting given explicitly must agree with the checkpoint."""
    defaults = {**GENERIC_DEFAULTS, **dataclasses.asdict(task.defaults), **task.option_defaults}
    adapt = config.adapt if config.adapt is not None else defaults["adapt"]
    if adapt in ("all", "all-generic") and task.defaults.inner_lr_all is not None:
        defaults["inner_lr"] = task.defaults.inner_lr_all
    changes = {}
    for name in RUN_FIELDS:
        value = getattr(config, name)
        if name in TASK_OPTIONS and name not in defaults and value is not None:
            raise ValueError(f"--{name.replace('_', '-')} applies to another task, not to "
                             f"--task {task.name}")
        if saved is not None:
            stored = saved["config"].get(name)
            if value is not None and value != stored:
                raise ValueError(f"--resume: the run in {config.out} has {name}={stored!r}, "
                                 f"this command asks for {value!r}; leave it out to continue "
                                 "that run, or choose another --out")
            changes[name] = stored
        elif value is None:
            changes[name] = defaults.get(name)
    return config.replace(**changes)


def _check_config(config: TrainConfig, world_size: int) -> None:
    for name in ("steps", "meta_batch", "inner_steps", "eval_tasks", "log_every",
                 "checkpoint_every", "threads"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for name in ("inner_lr", "meta_lr"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if config.meta_batch < world_size:
        raise ValueError(f"meta_batch={config.meta_batch} tasks cannot be split across "
                         f"{world_size} ranks; use at least one task per rank")


def _device(config: TrainConfig, world_size: int) -> torch.device:
    try:
        device = torch.device(config.device)
    except RuntimeError as error:
        raise ValueError(f"device {config.device!r} is not a device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: this torch sees no CUDA device")
        if world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)   # nccl's collectives run on the current device
    return device


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sums the meta-gradients over ranks in one call (each rank holds its shard's part of the
    global mean already)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _read_metrics(path: Path, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to]


def train(config: TrainConfig) -> dict:
    """Meta-trains ``config.task`` with ``config.algo`` up to ``config.steps`` meta-steps, then
    evaluates on held-out tasks. Writes, in ``config.out``:

    - ``metrics.jsonl``: every ``log_every`` steps, ``{"step", "outer_loss", "inner_loss_first",
      "inner_loss_last"}`` (and ``"accuracy"`` for classification), means over the step's tasks;
    - ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end, atomically;
    - ``summary.json``: ``{"task", "algo", "steps", "seconds_per_step", "eval": {...}}``;
    - ``curves.png``: the training curves and the inner-loss curve along the inner steps, where
      matplotlib is installed (the ``train`` extra); without it, one line on stderr says so.

    Under ``torch.distributed`` every rank draws the same global batch of tasks and trains on its
    share; the meta-gradients are summed (each rank's part is already divided by the global
    batch), and rank 0 alone writes. Returns the summary (an empty dict on the other ranks).

    Raises:
        ValueError: bad settings, a resume that does not match its checkpoint, or a folder that
            already holds a run without ``resume``.
        NonFiniteLoss: the loss or the meta-gradient stopped being finite.
    """
    rank, world_size = world()
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT
    saved = checkpoint.load_for_resume(checkpoint_path, config.resume)
    task = make_task(config.task)
    config = resolve(config, task, saved)
    _check_config(config, world_size)
    task.check(config.algo, config.adapt)
    task.configure(config)
    device = _device(config, world_size)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, task, saved, device, rank, world_size)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, task, saved: dict | None, device: torch.device, rank: int,
           world_size: int) -> dict:
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT
    torch.manual_seed(config.seed)
    model = task.build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    generator = torch.Generator().manual_seed(config.seed)
    start, train_seconds = 0, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        start, train_seconds = saved["step"], saved["train_seconds"]
        if start > config.steps:
            raise ValueError(f"--steps {config.steps}: the checkpoint in {out} is already at "
                             f"step {start}")

    def save(step: int) -> None:
        checkpoint.save_atomic({
            "step": step, "config": dataclasses.asdict(config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), "train_seconds": train_seconds,
        }, checkpoint_path)

    metrics_path = out / METRICS
    records: list[dict] = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # Lines past the checkpoint (a crash after logging) are replayed by the resumed run.
        records = _read_metrics(metrics_path, start) if saved is not None else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    params = list(model.parameters())
    last_saved = start
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress or rank != 0,
               desc=f"{config.task}/{config.algo}", unit="step", dynamic_ncols=True)
    try:
        with open(metrics_path, "a") if rank == 0 else open(os.devnull, "w") as log:
            for step in range(start + 1, config.steps + 1):
                began = time.perf_counter()
                batch = task.sample(config.meta_batch, generator, "train")
                optimizer.zero_grad(set_to_none=True)
                stats = meta_step(model, to_device(shard(batch, rank, world_size), device),
                                  config.algo, config.inner_steps, config.meta_batch)
                values = torch.stack([stats.outer_loss, stats.inner_loss_first,
                                      stats.inner_loss_last,
                                      stats.outer_loss.new_zeros(()) if stats.accuracy is None
                                      else stats.accuracy]).to(torch.float64)
                if world_size > 1:
                    dist.all_reduce(values)
                    _all_reduce_grads(params)
                values = (values / config.meta_batch).tolist()
                losses_finite = all(math.isfinite(v) for v in values)
                grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params
                                   if p.grad is not None)
                if not (losses_finite and grads_finite):
                    what = "loss" if not losses_finite else "meta-gradient"
                    raise NonFiniteLoss(
                        f"non-finite {what} at step {step} (outer loss {values[0]}, inner loss "
                        f"{values[1]} -> {values[2]}); stopped before applying it. The last good "
                        f"checkpoint, step {last_saved}, is kept in {checkpoint_path}"
                        + ("" if last_saved else " (none was written yet)")
                        + ". Try a smaller --inner-lr or --meta-lr.")
                optimizer.step()
                train_seconds += time.perf_counter() - began

                if step % config.log_every == 0 or step == config.steps:
                    record = {"step": step, "outer_loss": values[0],
                              "inner_loss_first": values[1], "inner_loss_last": values[2]}
                    if stats.accuracy is not None:
                        record["accuracy"] = values[3]
                    records.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if step % config.checkpoint_every == 0 or step == config.steps:
                    if rank == 0:
                        save(step)
                    last_saved = step
                bar.update(1)
                bar.set_postfix(loss=f"{values[0]:.4g}", refresh=False)
    finally:
        bar.close()

    summary: dict = {}
    if rank == 0:
        evaluation = evaluate(model, task, config.eval_tasks, config.meta_batch,
                              config.inner_steps, torch.Generator().manual_seed(EVAL_SEED),
                              device)
        done = max(config.steps, 1)
        summary = {"task": config.task, "algo": config.algo, "steps": config.steps,
                   "seconds_per_step": train_seconds / done,
                   "eval": {"query_loss_before_adapt": evaluation.query_loss_before_adapt,
                            "query_loss_after_adapt": evaluation.query_loss_after_adapt}}
        if evaluation.query_accuracy_after_adapt is not None:
            summary["eval"]["query_accuracy_after_adapt"] = evaluation.query_accuracy_after_adapt
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if _extras.installed("matplotlib"):
            from metakernels.train.plots import plot_curves
            plot_curves(records, evaluation, out / CURVES,
                        title=f"{config.task} / {config.algo} (adapt {config.adapt}), "
                              f"{config.steps} steps")
        else:
            # A bare install trains without matplotlib; the plot is the one thing left out.
            print(f"{CURVES} not drawn: it needs matplotlib ({_extras.install_command('train')}"
                  f"), after which `metakernels train --task {config.task} --algo {config.algo} "
                  f"--steps {config.steps} --out {shlex.quote(str(out))} --resume` draws it", file=sys.stderr)
    if world_size > 1:
        dist.barrier()
    return summary
