"""``metakernels.delta_rule`` on the CPU, measured side by side in one process: forward +
backward of every input (q, k, v, β and the initial state), float32, random cotangents of the
output and the final state, the ``delta-rule`` benchmark sizes (docs/conventions.md) in fla's
layout (B = 2, H = 16, T = 1024, K = V = 128: 32 tasks), interleaved repeats, medians of wall
and CPU time.

Contestants: the op on the cpu backend (which takes its chunked path there), the same with the
chunked path switched off (its step loop), ``metakernels.reference.delta_rule`` (the readable
recurrence, autograd, as fla's naive one); then the packed form:
the same two sequences packed with ``cu_seqlens`` (B = 1), eager and under
``torch.compile(fullgraph=True)`` (whose backward recomputes the forward).

    PYTHONPATH=. python bench/cpu_delta_rule.py --threads 1 [--repeats N] [--slow-repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import metakernels as mk
from metakernels import reference
from metakernels.benchmarks import timing
from metakernels.benchmarks.suite import machine_description
from metakernels.ops import _backends, unroll_path

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def load() -> str:
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


def inputs(batch, length, heads, dim, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    values = {
        "q": torch.randn(batch, length, heads, dim, generator=gen),
        "k": torch.nn.functional.normalize(torch.randn(batch, length, heads, dim, generator=gen),
                                           dim=-1),
        "v": torch.randn(batch, length, heads, dim, generator=gen),
        "beta": torch.rand(batch, length, heads, generator=gen).sigmoid(),
        "initial_state": torch.randn(batch, heads, dim, dim, generator=gen) / dim ** 0.5,
    }
    return {name: t.requires_grad_() for name, t in values.items()}


def step(call, leaves: dict, cotangents):
    """Forward and backward of every input: ``call(**leaves) -> (o, final_state)``."""
    o, final = call(**leaves)
    return torch.autograd.grad([o, final], list(leaves.values()), cotangents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-repeats", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_description(), flush=True)
    batch, heads, dim, length = 2, 16, 128, args.length
    leaves = inputs(batch, length, heads, dim)
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(batch, length, heads, dim, generator=gen),
                  torch.randn(batch, heads, dim, dim, generator=gen)]
    kernels = _backends.kernels("cpu")

    def op(**kw):
        return mk.delta_rule(**kw, output_final_state=True, backend="cpu")

    def op_step_loop(**kw):
        kernels.set_chunked_knobs(0, 32)
        try:
            return op(**kw)
        finally:
            kernels.set_chunked_knobs(-1, 32)

    def readable(**kw):
        return reference.delta_rule(**kw, output_final_state=True)

    # The two sequences packed along T (B = 1), from the same values.
    packed = {name: (t.detach().reshape(1, batch * length, *t.shape[2:]) if name != "initial_state"
                     else t.detach()).requires_grad_() for name, t in leaves.items()}
    cu = torch.tensor([0, length, 2 * length])

    def op_packed(**kw):
        return mk.delta_rule(**kw, output_final_state=True, cu_seqlens=cu, backend="cpu")

    compiled_packed = torch.compile(op_packed, fullgraph=True, backend="aot_eager")
    packed_cotangents = [cotangents[0].reshape(1, batch * length, heads, dim), cotangents[1]]

    runs = {
        "delta_rule (cpu)": lambda: step(op, leaves, cotangents),
        "delta_rule (cpu, step loop)": lambda: step(op_step_loop, leaves, cotangents),
        "reference.delta_rule": lambda: step(readable, leaves, cotangents),
        "packed, eager": lambda: step(op_packed, packed, packed_cotangents),
        "packed, torch.compile": lambda: step(compiled_packed, packed, packed_cotangents),
    }
    counts = {name: args.slow_repeats if name == "reference.delta_rule" else args.repeats
              for name in runs}
    def per_task(t):  # the op's reshape: [B, T, H, D] -> [B·H, T, 1, D]
        return t.transpose(1, 2).reshape(batch * heads, length, 1, -1)
    path = unroll_path(leaves["initial_state"].reshape(-1, dim, dim), per_task(leaves["k"]),
                       per_task(leaves["v"]), per_task(leaves["beta"][..., None])[..., 0, 0],
                       queries=per_task(leaves["q"]), backend="cpu")
    print(f"B={batch} H={heads} T={length} K=V={dim}, float32, {args.threads} thread(s); "
          f"cpu path: {path}", flush=True)
    for clock, read in CLOCKS.items():
        samples = timing.time_interleaved(runs, repeats=counts, warmup=1, clock=read)
        base = statistics.median(samples["delta_rule (cpu)"])
        print(f"  {clock} time ({load()}):")
        print(f"    {'contestant':<30}{'median ms':>11}{'x op':>8}")
        for name in runs:
            ms = statistics.median(samples[name])
            print(f"    {name:<30}{ms * 1e3:>11.1f}{ms / base:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
