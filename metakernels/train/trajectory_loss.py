"""``metakernels analyze trajectory-loss --run DIR``: for a trained ``reasoning`` run, the loss of
the answer read out of the fast weights after each prefix of the trajectory (0, 1, ..., L chunks,
one inner step each), on correct trajectories and on corrupted ones (one wrong step, the error
then propagated to the end), averaged over held-out questions.

The model reads the answer out of its :class:`~metakernels.nn.FastWeightMemory` after every
chunk, so one forward pass gives the whole curve (the op's readout); the analysis package's
``answer_loss_curve`` is the same measurement for Hugging Face causal LMs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from metakernels import _extras
from metakernels.train import checkpoint
from metakernels.train.config import TrainConfig
from metakernels.train.loop import CHECKPOINT, EVAL_SEED, resolve
from metakernels.train.tasks import make_task

CURVE_PNG, CURVE_JSON = "trajectory_loss.png", "trajectory_loss.json"


def load_run(run: str | Path):
    """The task, the trained model and the resolved settings of the run in ``run``."""
    path = Path(run) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"--run {run}: there is no {CHECKPOINT} (train a run there first)")
    saved = checkpoint.load(path)
    stored = saved["config"]
    if stored["task"] not in ("reasoning", "walk"):
        raise ValueError(f"--run {run} trained --task {stored['task']}; the trajectory loss is "
                         "defined for --task reasoning and --task walk runs")
    task = make_task(stored["task"])
    config = resolve(TrainConfig(task=stored["task"], algo=stored["algo"], out=str(run)), task,
                     saved)
    task.configure(config)
    model = task.build_model(config)
    model.load_state_dict(saved["model"])
    model.eval()
    return task, model, config


def trajectory_loss_curves(task, model, questions: int, seed: int = EVAL_SEED,
                           batch_size: int = 100) -> dict[str, list[float]]:
    """Mean answer loss after 0..L chunks, ``{"correct": [...], "corrupted": [...]}``, over
    ``questions`` held-out questions (each with its correct and its corrupted trajectories)."""
    generator = torch.Generator().manual_seed(seed)
    sums = {"correct": None, "corrupted": None}
    with torch.no_grad():
        for start in range(0, questions, batch_size):
            pair = task.sample_with_corruption(min(batch_size, questions - start), generator)
            for name, batch in zip(("correct", "corrupted"), pair):
                curve = model.answer_loss_by_prefix(batch).sum(0)
                sums[name] = curve if sums[name] is None else sums[name] + curve
    return {name: (total / questions).tolist() for name, total in sums.items()}


def plot_trajectory_loss(curves: dict[str, list[float]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name, curve in curves.items():
        axes.plot(range(len(curve)), curve, marker="o", label=f"{name} trajectories")
    axes.set(xlabel="trajectory chunks read (inner steps)",
             ylabel="answer loss (cross-entropy, nats)", title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def trajectory_loss_command(run: str, questions: int = 500, output: str | None = None) -> int:
    _extras.require("trajectory-loss", "transformers", "matplotlib")
    task, model, config = load_run(run)
    if config.no_trajectory:
        raise ValueError(f"--run {run} was trained with --no-trajectory: it reads no trajectory")
    curves = trajectory_loss_curves(task, model, questions)
    png = Path(output) if output else Path(run) / CURVE_PNG
    plot_trajectory_loss(curves, png, f"{config.algo}, {config.trajectories} trajectories per "
                                      f"question, length {config.trajectory_length}")
    png.with_suffix(".json").write_text(json.dumps(curves, indent=2) + "\n")
    print(json.dumps(curves))
    print(f"drawn to {png}")
    return 0
