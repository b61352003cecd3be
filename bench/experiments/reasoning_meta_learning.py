"""Reasoning as meta-learning, measured with the trainer's ``reasoning`` task (CPU, minutes).

Sweeps, each a ``metakernels train --task reasoning`` run evaluated on the same held-out
questions:

- support-set size: trajectories per question K = 1, 2, 4, 8 (length 4);
- trajectory length: S = 1, 2, 4, 8 chain steps (K = 1);
- trajectory versus none: ``--no-trajectory`` at every S of the length sweep;
- the answer loss read out after each trajectory prefix, on correct and on corrupted trajectories
  (``metakernels analyze trajectory-loss``), for the length-4 and length-8 runs, and for runs
  trained with ``--answer-every-step`` (the outer loss on the answer after every prefix).

Writes ``OUT/results.json``, ``OUT/README.md`` (the tables, with the commands) and the plots.
Run from the repository root::

    PYTHONPATH=. python bench/experiments/reasoning_meta_learning.py --out bench/results/reasoning
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "build" / "experiments" / "reasoning",
                        help="the training runs' folders (default build/experiments/reasoning)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--algo", default="maml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--questions", type=int, default=500,
                        help="held-out questions for the trajectory-loss curves")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)

    configs = {}
    for k in (1, 2, 4, 8):
        configs[f"K{k}-S4"] = {"trajectories": k, "trajectory_length": 4}
    for s in (1, 2, 4, 8):
        configs[f"K1-S{s}"] = {"trajectories": 1, "trajectory_length": s}
        configs[f"none-S{s}"] = {"trajectory_length": s, "no_trajectory": True}
    for s in (4, 8):
        configs[f"every-S{s}"] = {"trajectories": 1, "trajectory_length": s,
                                  "answer_every_step": True}
    python = [sys.executable, "-m", "metakernels"]

    def train_command(name: str, options: dict) -> list[str]:
        command = python + ["train", "--task", "reasoning", "--algo", args.algo, "--steps",
                            str(args.steps), "--seed", str(args.seed), "--threads", "1",
                            "--no-progress", "--out", str(args.runs / name)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            command += [flag] if value is True else [flag, str(value)]
        return command

    commands = {name: train_command(name, options) for name, options in configs.items()}
    todo = {n: c for n, c in commands.items() if not (args.runs / n / "summary.json").exists()}
    # The longest runs first, so the pool ends together.
    order = sorted(todo, key=lambda n: -configs[n].get("trajectories", 1)
                   * configs[n]["trajectory_length"] * (not configs[n].get("no_trajectory")))
    wall = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, todo[n]): n for n in order}
        for future in concurrent.futures.as_completed(futures):
            wall[futures[future]] = future.result()
            print(f"done {futures[future]} in {wall[futures[future]]:.0f} s", flush=True)

    curves = {}
    for name in ("K1-S4", "K1-S8", "K4-S4", "every-S4", "every-S8"):
        png = args.out / f"trajectory-loss-{name}.png"
        subprocess.run(python + ["analyze", "trajectory-loss", "--run", str(args.runs / name),
                                 "--questions", str(args.questions), "--output", str(png)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        curves[name] = json.loads(png.with_suffix(".json").read_text())

    summaries = {n: json.loads((args.runs / n / "summary.json").read_text()) for n in configs}
    learned_at = {n: steps_to_accuracy(args.runs / n / "metrics.jsonl") for n in configs}
    results = {"commands": {n: shlex.join(["python", *c[1:]]).replace(f"{ROOT}/", "")
                            for n, c in commands.items()},
               "configs": configs, "summaries": summaries, "steps_to_95": learned_at,
               "trajectory_loss": curves}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out)
    (args.out / "tables.md").write_text(tables(results))
    print(json.dumps({n: s["eval"] for n, s in summaries.items()}, indent=1))
    return 0


def steps_to_accuracy(metrics: Path, threshold: float = 0.95, window: int = 3) -> int | None:
    """The first logged step from which the training accuracy averages at least ``threshold``
    over ``window`` logged steps (a batch of 32 questions is noisy), or None."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for i in range(len(records) - window + 1):
        if sum(r["accuracy"] for r in records[i:i + window]) / window >= threshold:
            return records[i]["step"]
    return None


def tables(results: dict) -> str:
    """The sweeps as markdown tables."""
    summaries, configs = results["summaries"], results["configs"]
    lines = ["| run | K | S | trajectory | answer loss before | after | accuracy after | "
             "steps to 95% train acc. | s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, config in configs.items():
        e = summaries[name]["eval"]
        lines.append(
            f"| {name} | {config.get('trajectories', '-')} | {config['trajectory_length']} | "
            f"{'no' if config.get('no_trajectory') else 'yes'} | "
            f"{e['query_loss_before_adapt']:.3f} | {e['query_loss_after_adapt']:.4f} | "
            f"{e['query_accuracy_after_adapt']:.3f} | {results['steps_to_95'][name] or '-'} | "
            f"{summaries[name]['seconds_per_step']:.3f} |")
    lines += ["", "Answer loss (nats) read out after k trajectory chunks, k = 0 ... S, mean over "
              "held-out questions:", ""]
    for name, curves in results["trajectory_loss"].items():
        header = " | ".join(str(k) for k in range(len(curves["correct"])))
        lines += [f"{name}:", "", f"| trajectory | {header} |",
                  "|---|" + "---|" * len(curves["correct"])]
        for kind, curve in curves.items():
            lines.append(f"| {kind} | " + " | ".join(f"{v:.3g}" for v in curve) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summaries = results["summaries"]
    figure, (k_axes, s_axes) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [1, 2, 4, 8]
    k_axes.plot(ks, [summaries[f"K{k}-S4"]["eval"]["query_loss_after_adapt"] for k in ks],
                marker="o")
    k_axes.set(xscale="log", xticks=ks, xticklabels=ks, xlabel="trajectories per question (K)",
               ylabel="held-out answer loss after the trajectory", title="support-set size (S=4)")
    ss = [1, 2, 4, 8]
    for prefix, label in (("K1", "with trajectory"), ("none", "no trajectory")):
        s_axes.plot(ss, [summaries[f"{prefix}-S{s}"]["eval"]["query_accuracy_after_adapt"]
                         for s in ss], marker="o", label=label)
    s_axes.set(xscale="log", xticks=ss, xticklabels=ss, xlabel="chain length S",
               ylabel="held-out answer accuracy", title="trajectory length (K=1)")
    s_axes.legend()
    figure.tight_layout()
    figure.savefig(out / "sweeps.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
