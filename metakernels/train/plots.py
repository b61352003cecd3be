"""``curves.png``: the training curves of a run and its inner-loss curve along the inner steps."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_curves(records: list[dict], evaluation, path: Path, title: str) -> None:
    """Left: the outer (query) loss and the inner loss before the first and the last inner step,
    per logged meta-step. Right: on held-out tasks, the mean inner loss before each inner step,
    with the query loss before and after adaptation."""
    # A bare Figure draws with Agg and leaves pyplot's backend (the user's) alone.
    figure = Figure(figsize=(11, 4))
    train_axes, inner_axes = figure.subplots(1, 2)
    steps = [r["step"] for r in records]
    for key, label in (("outer_loss", "outer (query, after adaptation)"),
                       ("inner_loss_first", "inner, before step 1"),
                       ("inner_loss_last", "inner, before the last step")):
        train_axes.plot(steps, [r[key] for r in records], label=label)
    train_axes.set(xlabel="meta-step", ylabel="loss", title="training")
    if records and all(r[k] > 0 for r in records for k in ("outer_loss", "inner_loss_first")):
        train_axes.set_yscale("log")
    train_axes.legend()

    curve = evaluation.inner_curve
    inner_axes.plot(range(1, len(curve) + 1), curve, marker="o", label="inner (support) loss")
    inner_axes.axhline(evaluation.query_loss_before_adapt, color="gray", linestyle="--",
                       label="query loss before adaptation")
    inner_axes.axhline(evaluation.query_loss_after_adapt, color="green", linestyle="--",
                       label="query loss after adaptation")
    inner_axes.set(xlabel="inner step", ylabel="loss",
                   title="held-out tasks: along the inner loop")
    inner_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    inner_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
