"""Compile every Triton kernel launch of the GPU tests' shapes (tests/test_triton.py GPU_CASES)
for a GPU target, without a GPU, and print each kernel's shared memory; a launch that would not
fit the card prints its error. Checks the compile on a machine with no GPU.

    python bench/gpu/triton_compile_check.py [--capability 90] [CASE ...]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import make_inputs  # noqa: E402
from test_triton import GPU_CASES  # noqa: E402

from metakernels.triton import _launch  # noqa: E402
from metakernels.triton.compile_check import compile_linear_hvp, compile_unroll  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"default: all of {', '.join(GPU_CASES)}")
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 80")
    args = parser.parse_args()
    failures = 0
    for name in args.cases or list(GPU_CASES):
        case, _, dtypes = GPU_CASES[name]
        for dtype in dtypes:
            label = f"{name}/{str(dtype).replace('torch.', '')}"
            try:
                with _launch.compile_only(args.capability) as records:
                    compile_unroll(make_inputs(case), dtype, loss=case.loss,
                                   first_order=case.first_order)
            except RuntimeError as error:
                print(f"{label:34s} REFUSED {error}")
                continue
            except Exception as error:  # a compile error: what this script is for
                failures += 1
                print(f"{label:34s} FAILED {type(error).__name__}: {error}")
                continue
            for record in records:
                print(f"{label:34s} {record['kernel']:32s} grid={record['grid']} "
                      f"shared={record['shared_bytes']} B")
    for loss in ("mse", "ce"):
        with _launch.compile_only(args.capability) as records:
            compile_linear_hvp(loss, tasks=128, support=25, d_in=128, d_out=10,
                               dtype=torch.bfloat16)
        print(f"{'linear_hvp/' + loss:34s} {records[0]['kernel']:32s} "
              f"shared={records[0]['shared_bytes']} B")
    print("FAIL" if failures else "PASS", f"({failures} kernels failed to compile)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
