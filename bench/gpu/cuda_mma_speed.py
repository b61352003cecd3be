"""The CUDA backend's tensor-core kernels against its FMA kernels (and the Triton backend where
it is present), on the GPU configurations of docs/conventions.md, in one process:

    python bench/gpu/cuda_mma_speed.py [--configs large trajectory maml-small] [--repeats 20]

For each configuration: the meta-gradient of every contestant against the float64 reference
(the benchmark suite's tolerance), then forward + backward timed interleaved
(metakernels.benchmarks.timing, CUDA events). "cuda-mma" and "cuda-fma" are the same backend with
metakernels._C_cuda.set_mma_enabled(True / False) (METAKERNELS_CUDA_MMA=0 does the latter for a
whole process); "cuda-mma-s<n>" forces n CTAs per task over d_out (set_mma_splits, a tuning knob:
where it differs from the automatic choice, it says which default to keep). Prints one table; exits non-zero when a contestant's error is above the
tolerance on a configuration with T <= 16 (docs/conventions.md, accuracy), or above 1e-2 on any.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import metakernels as mk
from metakernels.benchmarks.configs import CONFIGS, make_problem
from metakernels.benchmarks.contestants import get_contestant
from metakernels.benchmarks.correctness import (TOLERANCE, max_relative_error,
                                                reference_meta_grad)
from metakernels.benchmarks.timing import time_interleaved
from metakernels.ops import _backends


def contestants(cuda, splits: list[int]) -> dict:
    """name -> meta-step callable; the CUDA variants switch the module's settings per call:
    cuda-mma (automatic d_out split), cuda-mma-s<n> (n CTAs per task, where the columns are
    independent), cuda-fma (no tensor cores)."""
    step = get_contestant("metakernels:cuda")

    def with_mma(enabled: bool, split: int = 0):
        def run(problem):
            cuda.set_mma_enabled(enabled)
            cuda.set_mma_splits(split)
            return step(problem)
        return run

    runs = {"cuda-mma": with_mma(True)}
    runs.update({f"cuda-mma-s{n}": with_mma(True, n) for n in splits})
    runs["cuda-fma"] = with_mma(False)
    if "triton" in mk.available_backends("cuda"):
        runs["triton"] = get_contestant("metakernels:triton")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["large", "trajectory", "maml-small"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4],
                        help="also time the tensor-core path with these forced d_out splits")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    cuda = _backends._module("cuda")[0]
    if cuda is None or not torch.cuda.is_available():
        print(f"no CUDA backend here: {_backends._module('cuda')[1]}")
        return 1
    dtype = getattr(torch, args.dtype)
    tolerance = TOLERANCE.get(dtype, 2e-2)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {args.dtype}  "
          f"repeats {args.repeats}  tolerance {tolerance:g} (docs/conventions.md: for T <= 16)")
    print(f"{'config':<12} {'contestant':<12} {'rel err':>9} {'median ms':>10} {'IQR ms':>8} "
          f"{'vs cuda-fma':>12} {'vs triton':>10}")
    before = cuda.mma_enabled()
    failures = 0
    for name in args.configs:
        config = CONFIGS[name]
        problem = make_problem(config, dtype=dtype, device="cuda")
        want = reference_meta_grad(problem)
        runs = contestants(cuda, args.splits)
        errors, notes = {}, {}
        for label, run in runs.items():
            start = cuda.mma_launches()
            errors[label] = max_relative_error(run(problem), want)
            notes[label] = "" if errors[label] <= tolerance else "  above tolerance"
            if label == "cuda-mma" and cuda.mma_launches() == start:
                notes[label] += "  (took the FMA kernels: shape or shared memory)"
            if errors[label] > tolerance and (config.steps <= 16 or not errors[label] < 1e-2):
                failures += 1
        samples = time_interleaved({label: (lambda run=run: run(problem))
                                    for label, run in runs.items()},
                                   repeats=args.repeats, warmup=3, device="cuda")
        medians = {label: statistics.median(s) * 1e3 for label, s in samples.items()}
        for label in runs:
            quartiles = statistics.quantiles([s * 1e3 for s in samples[label]], n=4)
            ratio_fma = medians["cuda-fma"] / medians[label]
            ratio_triton = medians.get("triton", float("nan")) / medians[label]
            print(f"{name:<12} {label:<12} {errors[label]:>9.2e} {medians[label]:>10.3f} "
                  f"{quartiles[2] - quartiles[0]:>8.3f} {ratio_fma:>11.2f}x "
                  f"{ratio_triton:>9.2f}x{notes[label]}")
        del problem, want
        torch.cuda.empty_cache()
    cuda.set_mma_enabled(before)
    cuda.set_mma_splits(0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
