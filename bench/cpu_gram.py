"""The cpu backend's Gram-space path and checkpointing (issue 7), measured side by side in one
process on this machine.

1. Speed: one second-order meta-step (forward + backward to the init) of ``metakernels:cpu``
   beside ``torch.func`` and the reference backend on the ``maml-small`` and
   ``trajectory``, interleaved repeats (metakernels.benchmarks.timing), medians; with the
   algorithm the cpu backend ran (metakernels.ops.fast_weight_unroll.unroll_path).
2. Memory: ``trajectory`` with T = 512 whose meta-gradient also covers the queries, or x and
   the queries (as when queries and keys come from a learned projection), so that the backward
   needs W_t of every step: ``checkpoint=True`` against ``checkpoint=False`` (store every step).
   Time interleaved in this process; peak memory in a fresh child process per variant, as
   metakernels.benchmarks.memory does (VmHWM increase after a warm-up step, median of 3).

    PYTHONPATH=. python bench/cpu_gram.py [--repeats N] [--threads N] [--clock cpu] [--out FILE]

``--clock cpu`` times the speed part in this thread's CPU time (time.thread_time, one thread
only) instead of wall time: on a machine shared with other jobs, wall times of calls longer
than a scheduler slice (torch.func's) are stretched more than short ones' (the fused op's), so
the wall-time ratios rise with the load; CPU-time ratios much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

import metakernels
from metakernels.benchmarks import CONFIGS, get_contestant, make_problem, memory, timing
from metakernels.benchmarks.configs import MetaProblem
from metakernels.benchmarks.contestants import outer_loss
from metakernels.benchmarks.suite import machine_description
from metakernels.ops.fast_weight_unroll import unroll_path

LONG_STEPS = 512
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


# The inputs besides the init that take a gradient, per measured setting.
LONG_LEAVES = {"init, queries": ("readout_queries",),
               "init, x, queries": ("support_x", "readout_queries")}


def long_problem(leaves: tuple[str, ...]) -> MetaProblem:
    """trajectory with T = 512; the batch tensors named in leaves take a gradient."""
    problem = make_problem(dataclasses.replace(CONFIGS["trajectory"], steps=LONG_STEPS))
    for name in leaves:
        problem.batch[name].requires_grad_()
    return problem


def long_meta_step(problem: MetaProblem, leaves: tuple[str, ...], checkpoint: bool,
                   cotangents: tuple | None = None):
    """The meta-gradient of the init and ``leaves``: of the outer loss (the whole meta-step), or,
    given ``cotangents`` (for W_T and the readout), of the fused op alone."""
    params, batch = problem.params, problem.batch
    out = metakernels.fast_weight_unroll(
        params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
        queries=batch["readout_queries"], backend="cpu", checkpoint=checkpoint)
    wrt = (params["weight"], *(batch[k] for k in leaves))
    if cotangents is not None:
        return torch.autograd.grad((out.weight, out.readout), wrt, cotangents)
    meta_loss = outer_loss(batch, {"weight": out.weight}, out.readout, "mse")
    return torch.autograd.grad(meta_loss, wrt)


def op_cotangents(problem: MetaProblem) -> tuple:
    c = problem.config
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(c.tasks, c.d_in, c.d_out, generator=gen),
            torch.randn(c.tasks, c.steps, c.queries, c.d_out, generator=gen))


def cpu_path(problem: MetaProblem, **kwargs) -> str:
    params, batch = problem.params, problem.batch
    return unroll_path(params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
                       steps=problem.steps, loss=problem.config.loss, bias=params.get("bias"),
                       queries=batch.get("readout_queries"), backend="cpu", **kwargs)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def outer_loss_alone(problem: MetaProblem):
    """The meta-step with a free fused op: the outer loss and its backward from precomputed
    outputs of the op (leaves), i.e. the part of every metakernels contestant's time that the
    kernels cannot remove."""
    params, batch = problem.params, problem.batch
    with torch.no_grad():
        out = metakernels.fast_weight_unroll(
            params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
            steps=problem.steps, loss=problem.config.loss, bias=params.get("bias"),
            queries=batch.get("readout_queries"), backend="cpu")
    fast = {"weight": out.weight.requires_grad_()}
    if out.bias is not None:
        fast["bias"] = out.bias.requires_grad_()
    readout = None if out.readout is None else out.readout.requires_grad_()
    leaves = tuple(fast.values()) + ((readout,) if readout is not None else ())

    def step():
        meta_loss = outer_loss(batch, fast, readout, problem.config.loss)
        return torch.autograd.grad(meta_loss, leaves, allow_unused=True)
    return step


def speed(config_name: str, repeats: int, log, clock: str = "wall") -> None:
    problem = make_problem(CONFIGS[config_name])
    names = ["metakernels:cpu", "torch.func", "metakernels:reference"]
    runs = {name: (lambda step=get_contestant(name): step(problem)) for name in names}
    runs["outer loss alone"] = outer_loss_alone(problem)
    samples = timing.time_interleaved(runs, repeats=repeats, warmup=3, clock=CLOCKS[clock])
    base = median_ms(samples["metakernels:cpu"])
    log(f"\n{config_name}: {CONFIGS[config_name].describe()}; cpu path: {cpu_path(problem)}; "
        f"{clock} time")
    log(f"  {'contestant':<24}{'median ms':>10}{'x cpu':>8}")
    for name in runs:
        ms = median_ms(samples[name])
        log(f"  {name:<24}{ms:>10.3f}{ms / base:>8.2f}")
    floor = median_ms(samples["outer loss alone"])
    log(f"  torch.func / outer loss alone: {median_ms(samples['torch.func']) / floor:.1f} "
        "(the ratio a free fused op would reach)")


def kernels_alone(repeats: int, log, clock: str = "wall") -> None:
    """The fused op's forward + backward on maml-small's inputs (a fixed cotangent for W_T, no
    outer loss): the Gram path against the step loop, forced by an lr_scale of ones (the same
    function, which the Gram path does not take)."""
    problem = make_problem(CONFIGS["maml-small"])
    weight, batch = problem.params["weight"], problem.batch
    c = problem.config
    cotangent = torch.randn(c.tasks, c.d_in, c.d_out, generator=torch.Generator().manual_seed(1))
    ones = torch.ones(c.d_in, c.d_out)

    def step(lr_scale):
        out = metakernels.fast_weight_unroll(weight, batch["support_x"], batch["support_y"],
                                             problem.inner_lr, steps=c.steps, lr_scale=lr_scale,
                                             backend="cpu")
        return torch.autograd.grad(out.weight, weight, cotangent)

    runs = {"gram": lambda: step(None), "step loop": lambda: step(ones)}
    samples = timing.time_interleaved(runs, repeats=repeats, warmup=3, clock=CLOCKS[clock])
    base = median_ms(samples["gram"])
    log("\nmaml-small, the fused op alone (forward + backward, cotangent for W_T): Gram path vs "
        f"step loop; {clock} time")
    for name in runs:
        log(f"  {name:<24}{median_ms(samples[name]):>10.3f}{median_ms(samples[name]) / base:>8.2f}")


def long_trajectory(setting: str, repeats: int, log) -> None:
    leaves = LONG_LEAVES[setting]
    problem = long_problem(leaves)
    c = problem.config
    log(f"\ntrajectory, T = {LONG_STEPS} (B={c.tasks} n={c.support} {c.d_in}x{c.d_out} "
        f"m={c.queries}), meta-gradient of: {setting}")
    variants = {"store every step": False, "checkpoint": True}
    for name, checkpoint in variants.items():
        log(f"  {name}: path {cpu_path(problem, checkpoint=checkpoint)}")
    runs = {name: (lambda c=checkpoint: long_meta_step(problem, leaves, c))
            for name, checkpoint in variants.items()}
    samples = timing.time_interleaved(runs, repeats=repeats, warmup=1)
    inputs = sum(t.numel() * t.element_size()
                 for t in (*problem.params.values(), *problem.batch.values()))
    del problem, runs
    peaks = {(name, scope): child_peak(setting, checkpoint, scope)
             for name, checkpoint in variants.items() for scope in SCOPES}
    for name in variants:  # the meta-step's peak with its inputs (x, y, queries, targets, init)
        peaks[name, "meta-step + inputs"] = peaks[name, "meta-step"] + inputs
    scopes = ("meta-step + inputs", *SCOPES)
    base_ms = median_ms(samples["store every step"])
    log(f"  {'variant':<18}{'median ms':>10}{'time ratio':>11}" +
        "".join(f"{'peak MiB ' + scope:>{max(22, len(scope) + 11)}}{'ratio':>7}"
                for scope in scopes))
    for name in variants:
        ms = median_ms(samples[name])
        row = f"  {name:<18}{ms:>10.1f}{ms / base_ms:>11.2f}"
        for scope in scopes:
            peak, base = peaks[name, scope], peaks["store every step", scope]
            row += f"{peak / 2**20:>{max(22, len(scope) + 11)}.1f}{peak / base:>7.3f}"
        log(row)
    outer = child_peak(setting, False, "outer")
    log(f"  the outer loss alone (forward + backward from a given readout): {outer / 2**20:.1f} "
        f"MiB, {outer / peaks['store every step', 'meta-step']:.3f} of store-every-step's "
        "meta-step peak: no fused op can bring the meta-step below it")


# What the peak covers (above the inputs already resident): the whole meta-step (outer loss
# included), or the fused op alone (fixed cotangents for W_T and the readout, allocated before
# the measurement). memory_child also measures "outer", the outer loss alone (its forward and
# backward from a readout computed before the measurement: the part of the meta-step's peak that
# the op cannot remove).
SCOPES = ("meta-step", "op")


def child_peak(setting: str, checkpoint: bool, scope: str) -> int:
    done = subprocess.run([sys.executable, __file__, "--memory-child",
                           json.dumps([setting, checkpoint, scope]),
                           "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, env=memory._child_env(), check=True)
    return int(done.stdout.strip().splitlines()[-1])


def memory_child(setting: str, checkpoint: bool, scope: str) -> int:
    """Peak RSS increase of one long meta-step in this (fresh) process, after a warm-up step."""
    leaves = LONG_LEAVES[setting]
    problem = long_problem(leaves)
    cotangents = op_cotangents(problem) if scope == "op" else None
    if scope == "outer":
        params, batch = problem.params, problem.batch
        with torch.no_grad():
            readout = metakernels.fast_weight_unroll(
                params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
                queries=batch["readout_queries"], backend="cpu").readout.requires_grad_()

        def run():
            meta_loss = outer_loss(problem.batch, {}, readout, "mse")
            return torch.autograd.grad(meta_loss, readout)
    else:
        def run():
            return long_meta_step(problem, leaves, checkpoint, cotangents)
    return peak_increase(run)


def peak_increase(run) -> int:
    """Peak RSS increase of ``run()`` in this process, after a warm-up call, median of 3."""
    run()
    increases = []
    for _ in range(3):
        gc.collect()
        memory._release_free_heap()
        if not memory._reset_high_water_mark():
            raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
        before = memory._status_bytes("VmRSS")
        run()
        increases.append(memory._status_bytes("VmHWM") - before)
    return int(statistics.median(increases))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-speed", action="store_true", help="only the T = 512 part")
    parser.add_argument("--skip-long", action="store_true", help="skip the T = 512 part")
    parser.add_argument("--long-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="time the speed part in wall time (default) or this thread's CPU "
                             "time (with --threads 1 only)")
    parser.add_argument("--out", help="also write the log here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu measures this thread only: pass --threads 1")
    if args.memory_child is not None:
        print(memory_child(*json.loads(args.memory_child)))
        return 0
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    log(f"metakernels {metakernels.__version__}, {now}")
    log("machine: " + ", ".join(f"{k} {v}" for k, v in machine_description().items()))
    log("command: PYTHONPATH=. python " + " ".join(sys.argv))
    if not args.skip_speed:
        for name in ("maml-small", "trajectory"):
            speed(name, args.repeats, log, args.clock)
        kernels_alone(args.repeats, log, args.clock)
    if not args.skip_long:
        for setting in LONG_LEAVES:
            long_trajectory(setting, args.long_repeats, log)
        log(f"\npeak MiB: {memory.RESET_METHOD}")
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
