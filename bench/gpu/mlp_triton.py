"""The Triton MLP fast-weight kernels on a GPU (bench/gpu/check.sh, stage 4c): maml-sinusoid and
ttt-mlp (docs/ops/fast_weight_mlp.md), forward + backward of the whole second-order meta-step
through ``fast_weight_mlp_meta_loss(..., backend="triton")``, float32, after a check of its
meta-gradient against the reference backend in float64 on the same values (relative error at
most 1e-4), timed interleaved against the reference backend and ``torch.func`` (vmap over tasks
of the unrolled loop) in this process (``torch.cuda.Event`` pairs, median).

A configuration outside the Triton kernels' limits (``mlp_unsupported_reason``: ttt-mlp's
256-wide hidden layer) prints the reason on its row instead of a time.

    python bench/gpu/mlp_triton.py [--repeats 10] [--out mlp-triton.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from metakernels import triton as triton_kernels
from metakernels.benchmarks import timing
from metakernels.benchmarks.mlp import (MLP_CONFIGS, MlpProblem, make_problem,
                                        metakernels_contestant, torch_func_contestant)

TOLERANCE = 1e-4


def on_cuda(problem: MlpProblem, dtype) -> MlpProblem:
    params = [p.detach().to("cuda", dtype).requires_grad_() for p in problem.params]
    move = lambda t: t.to("cuda", dtype)  # noqa: E731
    return MlpProblem(problem.config, params, move(problem.x), move(problem.y),
                      move(problem.query_x), move(problem.query_y))


def rel_err(got: list, want: list) -> float:
    diff = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, want)))
    norm = torch.sqrt(sum((b.double() ** 2).sum() for b in want))
    return float(diff / norm)


def run_config(name: str, repeats: int) -> str:
    config = MLP_CONFIGS[name]
    rows = config.queries
    reason = triton_kernels.mlp_unsupported_reason(list(config.widths), config.support, rows)
    if reason is not None:
        return f"| {name} | unsupported: {reason} | - | - | - | - |"
    problem = make_problem(config, torch.float32)
    f32 = on_cuda(problem, torch.float32)
    triton_run = metakernels_contestant("triton")
    want = metakernels_contestant("reference")(on_cuda(f32, torch.float64))
    err = rel_err(triton_run(f32), want)
    if not err <= TOLERANCE:
        return f"| {name} | FAIL: meta-gradient rel err {err:.2e} > {TOLERANCE:g} | - | - | - | - |"
    runs = {"triton": lambda: triton_run(f32),
            "triton+ckpt": lambda: metakernels_contestant("triton", checkpoint=True)(f32),
            "reference": lambda: metakernels_contestant("reference")(f32),
            "torch.func": lambda: torch_func_contestant(f32)}
    samples = timing.time_interleaved(runs, repeats=repeats, warmup=2, device="cuda")
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return (f"| {name} | {ms['triton']:.3f} | {ms['triton+ckpt']:.3f} | "
            f"{ms['reference'] / ms['triton']:.2f} | {ms['torch.func'] / ms['triton']:.2f} | "
            f"{err:.1e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--config", action="append", choices=sorted(MLP_CONFIGS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    lines = [f"Triton MLP meta-step on {torch.cuda.get_device_name()}, float32, "
             "forward + backward, median ms",
             "",
             "| config | triton ms | triton+ckpt ms | × reference | × torch.func | "
             "f32 rel err vs f64 reference |",
             "|---|---|---|---|---|---|"]
    failed = False
    for name in args.config or ["maml-sinusoid", "ttt-mlp"]:
        try:
            line = run_config(name, args.repeats)
        except Exception as error:  # one configuration's failure must not hide the other's
            line = f"| {name} | FAIL: {type(error).__name__}: {error} | - | - | - | - |"
        failed |= "FAIL" in line
        lines.append(line)
        print(line, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
