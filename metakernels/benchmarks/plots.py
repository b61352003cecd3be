"""Scaling curves of the sweeps: time and peak memory against B, T, n or d, log-log, one line per
contestant, each with the slope of a least-squares line through its points in log-log space (a
slope of 1: cost grows in proportion to the size)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from metakernels.benchmarks.bench import CaseResult, short_name

METRICS = {"time": ("median_ms", "median ms per meta-step"),
           "memory": ("peak_mib", "peak MiB")}


def curves(results: list[CaseResult], axis: str,
           metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """For each contestant, the sweep values of ``axis`` and its figures at them (points where
    it did not agree or was not measured are dropped)."""
    attribute = METRICS[metric][0]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for result in results:
        if result.case.sweep is None or result.case.sweep[0] != axis:
            continue
        for record in result.records:
            value = getattr(record, attribute)
            if record.agrees and value is not None and value > 0:
                xs, ys = out.setdefault(short_name(record.contestant), ([], []))
                xs.append(result.case.sweep[1])
                ys.append(value)
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """The log-log slope of a least-squares fit; NaN with fewer than two distinct sizes."""
    if len(set(xs)) < 2:
        return math.nan
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def slopes(results: list[CaseResult], axes: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """``{axis: {contestant: {"time": slope, "memory": slope}}}``."""
    table: dict[str, dict[str, dict]] = {}
    for axis in axes:
        for metric in METRICS:
            for name, (xs, ys) in curves(results, axis, metric).items():
                table.setdefault(axis, {}).setdefault(name, {})[metric] = slope(xs, ys)
    return table


def plot_sweeps(results: list[CaseResult], axes: tuple[str, ...], directory: Path,
                title: str) -> list[Path]:
    """One PNG per axis, time and memory side by side; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for axis in axes:
        figure, panels = plt.subplots(1, 2, figsize=(12, 4.5))
        for panel, metric in zip(panels, METRICS):
            for name, (xs, ys) in sorted(curves(results, axis, metric).items()):
                fit = slope(xs, ys)
                label = f"{name} (slope {fit:.2f})" if not math.isnan(fit) else name
                panel.plot(xs, ys, marker="o", label=label)
            panel.set_xscale("log", base=2)
            panel.set_yscale("log")
            panel.set_xlabel(axis)
            panel.set_ylabel(METRICS[metric][1])
            panel.grid(True, which="both", alpha=0.3)
            if panel.lines:
                panel.legend(fontsize=8)
            else:
                panel.set_title(f"{metric} not measured", fontsize=9)
        figure.suptitle(f"{title}: cost against {axis}")
        figure.tight_layout()
        path = directory / f"sweep-{axis}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def slopes_markdown(table: dict[str, dict[str, dict]]) -> str:
    """The fitted slopes as a markdown table, one row per contestant, time/memory per axis."""
    axes = list(table)
    names = sorted({name for per_axis in table.values() for name in per_axis})
    lines = ["| contestant | " + " | ".join(f"time ~ {a}^k | memory ~ {a}^k" for a in axes) + " |",
             "|---|" + "---:|" * (2 * len(axes))]
    for name in names:
        cells = []
        for axis in axes:
            fits = table[axis].get(name, {})
            cells += [format(fits.get(m, math.nan), ".2f") for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
