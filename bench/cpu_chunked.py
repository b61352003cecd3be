"""The cpu backend's chunked path (issue 14), measured side by side in one process.

1. Speed: one second-order meta-step (forward + backward to the init) on the
   ``delta-rule`` configuration (docs/conventions.md) (full size: B=32, T=1024, n=1, 128×128, m=1)
   and ``trajectory``: ``metakernels:cpu`` (which takes the chunked path there; ``unroll_path`` is
   printed), the same backend with the chunked path switched off (its step loop, the cpu path before
   this issue), ``torch.func`` and the reference backend, interleaved repeats, medians, wall and CPU
   time.
2. ``--switch``: the fused op alone (forward + backward of every input, random cotangents),
   chunked against the step loop over n, d and m: where the switch belongs
   (``unroll_chunked_cheaper`` in csrc/include/metakernels/fast_weight_chunked.h).
3. ``--numerics``: float32 error against the float64 reference, chunked path and step loop,
   as T grows and as η‖x‖² nears 2 (normalised keys, n = 1, d = 64).

    PYTHONPATH=. python bench/cpu_chunked.py --threads 1 [--repeats N] [--switch] [--numerics]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

import metakernels
from metakernels.benchmarks import CONFIGS, get_contestant, make_problem, timing
from metakernels.benchmarks.suite import machine_description
from metakernels.ops import _backends
from metakernels.ops.fast_weight_unroll import unroll_path

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@contextlib.contextmanager
def chunked(force: int, rows: int = 32):
    """The cpu chunked path forced on (1), off (0) or by its size rule (-1)."""
    kernels = _backends.kernels("cpu")
    kernels.set_chunked_knobs(force, rows)
    try:
        yield
    finally:
        kernels.set_chunked_knobs(-1, 32)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def speed(config_name: str, repeats: int, slow_repeats: int, log) -> None:
    problem = make_problem(CONFIGS[config_name])
    params, batch = problem.params, problem.batch
    path = unroll_path(params["weight"], batch["support_x"], batch["support_y"],
                       problem.inner_lr, queries=batch.get("readout_queries"), backend="cpu")
    cpu_step = get_contestant("metakernels:cpu")

    def step_loop():
        with chunked(0):
            return cpu_step(problem)

    runs = {"metakernels:cpu": lambda: cpu_step(problem), "cpu step loop": step_loop,
            "torch.func": lambda s=get_contestant("torch.func"): s(problem),
            "metakernels:reference": lambda s=get_contestant("metakernels:reference"): s(problem)}
    counts = {"metakernels:cpu": repeats, "cpu step loop": repeats, "torch.func": slow_repeats,
              "metakernels:reference": slow_repeats}
    log(f"\n{config_name}: {CONFIGS[config_name].describe()}; cpu path: {path}")
    for clock in CLOCKS:
        samples = timing.time_interleaved(runs, repeats=counts, warmup=1, clock=CLOCKS[clock])
        base = median_ms(samples["metakernels:cpu"])
        log(f"  {clock} time ({uptime()}):")
        log(f"    {'contestant':<24}{'median ms':>11}{'x cpu':>8}")
        for name in runs:
            ms = median_ms(samples[name])
            log(f"    {name:<24}{ms:>11.2f}{ms / base:>8.2f}")


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


def op_inputs(tasks, steps, n, d, m, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(tasks, steps, n, d, generator=gen), dim=-1)
    inputs = dict(weight=torch.randn(tasks, d, d, generator=gen) / d ** 0.5, x=x,
                  y=torch.randn(tasks, steps, n, d, generator=gen),
                  lr=0.5 * torch.rand(tasks, steps, generator=gen),
                  queries=torch.randn(tasks, steps, m, d, generator=gen) / d ** 0.5)
    return {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}


def op_step(inputs, wrt):
    out = metakernels.fast_weight_unroll(**inputs, backend="cpu")
    return torch.autograd.grad(out.weight.sum() + out.readout.sum(),
                               tuple(inputs[k] for k in wrt))


def switch(repeats: int, log) -> None:
    log(f"\nthe op alone (fwd + bwd), B = 4, T = 128, CPU time ({uptime()}): step loop ms / "
        "chunked ms, for the init's gradient alone and for every input's (x and queries' "
        "included: the step loop stores W_t)")
    log(f"  {'n':>3}{'d':>5}{'m':>4}{'init: chunked':>15}{'steps':>8}{'ratio':>7}  rule"
        f"{'all: chunked':>15}{'steps':>8}{'ratio':>7}  rule")
    expected = _backends.kernels("cpu").chunked_expected
    for d in (32, 64, 128):
        for n in (1, 2, 4, 8, 16):
            for m in sorted({1, n}):
                inputs = op_inputs(4, 128, n, d, m)
                row = f"  {n:>3}{d:>5}{m:>4}"
                for wrt, states in ((("weight",), False), (tuple(inputs), True)):
                    only = {k: (v if k in wrt else v.detach()) for k, v in inputs.items()}

                    def forced(force, only=only, wrt=wrt):
                        def run():
                            with chunked(force):
                                return op_step(only, wrt)
                        return run
                    samples = timing.time_interleaved({"chunked": forced(1), "steps": forced(0)},
                                                      repeats=repeats, warmup=1,
                                                      clock=time.thread_time)
                    c, s = median_ms(samples["chunked"]), median_ms(samples["steps"])
                    rule = "chunked" if expected(128, n, d, d, m, states) else "steps"
                    row += f"{c:>15.2f}{s:>8.2f}{s / c:>7.2f}  {rule:<7}"
                log(row)


def numerics(log) -> None:
    from metakernels.ops.fast_weight_unroll import fast_weight_unroll
    log("\nfloat32 error against the float64 reference (max over W_T, readout and every "
        "gradient), n = 1, d = 64, B = 2, normalised keys, η‖x‖² = s·U(0.5, 1):")
    log(f"  {'T':>5}{'s':>6}{'chunked':>12}{'step loop':>12}")
    for step_size in (1.0, 1.5, 1.9):
        for steps in (16, 64, 256, 1024):
            gen = torch.Generator().manual_seed(steps)
            d = 64
            x = torch.nn.functional.normalize(
                torch.randn(2, steps, 1, d, generator=gen, dtype=torch.float64), dim=-1)
            base = dict(weight=torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5,
                        x=x, y=torch.randn(2, steps, 1, d, generator=gen, dtype=torch.float64),
                        lr=step_size * (0.5 + 0.5 * torch.rand(2, steps, generator=gen,
                                                               dtype=torch.float64)),
                        queries=torch.randn(2, steps, 1, d, generator=gen,
                                            dtype=torch.float64) / d ** 0.5)
            cot = None

            def run(dtype, backend, force=-1):
                nonlocal cot
                inputs = {k: v.to(dtype).requires_grad_() for k, v in base.items()}
                with chunked(force):
                    out = fast_weight_unroll(**inputs, backend=backend)
                    if cot is None:
                        g = torch.Generator().manual_seed(1)
                        cot = (torch.randn(out.weight.shape, generator=g, dtype=torch.float64),
                               torch.randn(out.readout.shape, generator=g, dtype=torch.float64))
                    grads = torch.autograd.grad((out.weight, out.readout), tuple(inputs.values()),
                                                (cot[0].to(dtype), cot[1].to(dtype)))
                return (out.weight, out.readout) + grads

            want = run(torch.float64, "reference")

            def error(got):
                return max(((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want))
            log(f"  {steps:>5}{step_size:>6.1f}{error(run(torch.float32, 'cpu', 1)):>12.2e}"
                f"{error(run(torch.float32, 'cpu', 0)):>12.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slow-repeats", type=int, default=3,
                        help="repeats of torch.func and the reference (seconds each at T = 1024)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--configs", default="delta-rule,trajectory")
    parser.add_argument("--switch", action="store_true")
    parser.add_argument("--numerics", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() != 1:
        parser.error("CPU time measures this thread only: pass --threads 1")
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"metakernels {metakernels.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log("machine: " + ", ".join(f"{k} {v}" for k, v in machine_description().items()))
    log("command: PYTHONPATH=. python " + " ".join(sys.argv))
    for name in filter(None, args.configs.split(",")):
        speed(name, args.repeats, args.slow_repeats, log)
    if args.switch:
        switch(args.repeats, log)
    if args.numerics:
        numerics(log)
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
