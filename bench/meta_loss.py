"""fast_weight_meta_loss (issue 13) measured side by side in one process on this machine.

1. Speed: one second-order meta-step (forward + backward to the init) of
   ``metakernels:cpu+loss`` (the fused meta-loss op) beside ``metakernels:cpu`` (the op, then
   the outer loss in PyTorch) and ``torch.func`` on the ``maml-small``, ``maml-ce`` and
   ``trajectory``: interleaved repeats, medians, in wall time and in this thread's CPU time
   (``time.thread_time``: on a shared machine wall-time ratios grow with the load).
2. Memory: ``trajectory`` at T = 512 whose meta-gradient also covers the queries (so the
   backward needs W_t of every step): the fused op (store every step, and checkpointed) against
   the store-every-step op-plus-PyTorch-loss meta-step; time interleaved here, peak RSS increase
   in a fresh child process per variant (after a warm-up step, median of 3).

    PYTHONPATH=. python bench/meta_loss.py [--repeats N] [--threads 1] [--skip-long] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import metakernels
from metakernels.benchmarks import CONFIGS, get_contestant, make_problem, memory, timing
from metakernels.benchmarks.suite import machine_description
from metakernels.ops import meta_loss_path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cpu_gram import (LONG_STEPS, long_meta_step, long_problem, median_ms,  # noqa: E402
                      peak_increase)

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
LEAVES = ("readout_queries",)


def speed(config_name: str, repeats: int, log) -> None:
    problem = make_problem(CONFIGS[config_name])
    names = ["metakernels:cpu+loss", "metakernels:cpu", "torch.func"]
    runs = {name: (lambda step=get_contestant(name): step(problem)) for name in names}
    p, b = problem.params, problem.batch
    readout = "readout_queries" in b
    path = meta_loss_path(p["weight"], b["support_x"], b["support_y"], problem.inner_lr,
                          b["readout_queries" if readout else "query_x"],
                          b["readout_y" if readout else "query_y"], steps=problem.steps,
                          loss=problem.config.loss, bias=p.get("bias"), backend="cpu")
    log(f"\n{config_name}: {CONFIGS[config_name].describe()}; fused path: {path}")
    for clock in ("wall", "cpu"):
        samples = timing.time_interleaved(runs, repeats=repeats, warmup=3, clock=CLOCKS[clock])
        base = median_ms(samples["metakernels:cpu+loss"])
        func = median_ms(samples["torch.func"])
        log(f"  {clock} time: " + ", ".join(
            f"{name} {median_ms(samples[name]):.3f} ms" for name in names)
            + f"; torch.func / cpu+loss = {func / base:.2f}, "
            f"torch.func / cpu = {func / median_ms(samples['metakernels:cpu']):.2f}")


def fused_long_step(problem, checkpoint: bool):
    params, batch = problem.params, problem.batch
    meta_loss = metakernels.fast_weight_meta_loss(
        params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
        batch["readout_queries"], batch["readout_y"], reduction="sum", backend="cpu",
        checkpoint=checkpoint)
    return torch.autograd.grad(meta_loss, (params["weight"], batch["readout_queries"]))


VARIANTS = {"op + torch loss, store every step": ("op", False),
            "op + torch loss, checkpoint": ("op", True),
            "fused loss, store every step": ("fused", False),
            "fused loss, checkpoint": ("fused", True)}


def variant_step(name: str, problem):
    kind, checkpoint = VARIANTS[name]
    if kind == "op":
        return lambda: long_meta_step(problem, LEAVES, checkpoint)
    return lambda: fused_long_step(problem, checkpoint)


def long_trajectory(repeats: int, log) -> None:
    problem = long_problem(LEAVES)
    c = problem.config
    log(f"\ntrajectory, T = {LONG_STEPS} (B={c.tasks} n={c.support} {c.d_in}x{c.d_out} "
        f"m={c.queries}), meta-gradient of the init and the queries")
    runs = {name: variant_step(name, problem) for name in VARIANTS}
    samples = timing.time_interleaved(runs, repeats=repeats, warmup=1)
    del problem, runs
    peaks = {name: child_peak(name) for name in VARIANTS}
    base = "op + torch loss, store every step"
    for name in VARIANTS:
        log(f"  {name:<36}{median_ms(samples[name]):>10.1f} ms "
            f"({median_ms(samples[name]) / median_ms(samples[base]):.2f}x)"
            f"{peaks[name] / 2**20:>10.1f} MiB ({peaks[name] / peaks[base]:.3f}x)")


def child_peak(name: str) -> int:
    done = subprocess.run([sys.executable, __file__, "--memory-child", name,
                           "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, env=memory._child_env(), check=True)
    return int(done.stdout.strip().splitlines()[-1])


def memory_child(name: str) -> int:
    return peak_increase(variant_step(name, long_problem(LEAVES)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--long-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--configs", default="maml-small,maml-ce,trajectory")
    parser.add_argument("--out")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(memory_child(args.memory_child))
        return
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    log(f"{machine_description()}; torch threads {torch.get_num_threads()}; "
        f"load average {open('/proc/loadavg').read().split()[:3]}")
    if not args.skip_speed:
        for name in args.configs.split(","):
            speed(name, args.repeats, log)
    if not args.skip_long:
        long_trajectory(args.long_repeats, log)
    log(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
