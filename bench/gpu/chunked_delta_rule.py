"""The Triton chunked kernels on the delta rule against flash-linear-attention's
``chunk_delta_rule`` and the Triton step kernels (issue 14), on a CUDA GPU, forward + backward:

    python bench/gpu/chunked_delta_rule.py [--out FILE.md] [--repeats N]

Shapes: the ``delta-rule`` (32 tasks = B 2 × H 16, T = 1024, 128 × 128, m = 1) and fla's own
benchmark shapes (benchmarks/ops/benchmark_delta_rule.py: model width 2048, head dim 128, so
H = 16; (B, T) = (8, 2048), (4, 4096), (2, 8192)), in bfloat16 and float32. Each contestant gets
its inputs in its own layout (fla: ``[B, T, H, D]``; metakernels: ``[B·H, T, 1, D]``), made
before timing, and the gradients of q, k, v, β (and metakernels' of the zero initial state,
which fla does not take). The target of the issue: chunked / fla ≤ 1.0 (fwd + bwd). Timing: CUDA
events, median of the repeats after two warm-up calls. Before timing, the chunked output is
checked against fla's (relative error printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import metakernels as mk
from metakernels.ops import _backends, unroll_path

SHAPES = [("delta-rule (standard)", 2, 1024, 16, 128), ("fla", 8, 2048, 16, 128),
          ("fla", 4, 4096, 16, 128), ("fla", 2, 8192, 16, 128)]


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out")
    parser.add_argument("--max-shapes", type=int, default=len(SHAPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("chunked_delta_rule: no CUDA device")
        return 1
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError as error:
        chunk_delta_rule = None
        print(f"fla not importable ({error}): its column is left empty")
    kernels = _backends.kernels("triton")
    lines = [f"GPU: {torch.cuda.get_device_name()}; command: python bench/gpu/chunked_delta_rule.py",
             "", "| shape | dtype | fla chunk_delta_rule ms | triton chunked ms | triton step loop ms "
             "| chunked / fla | chunked / steps | path | max rel. err vs fla |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, batch, length, heads, dim in SHAPES[:args.max_shapes]:
        for dtype in (torch.bfloat16, torch.float32):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(batch, length, heads, dim, device="cuda", dtype=dtype, generator=gen)
            k = torch.nn.functional.normalize(torch.randn(batch, length, heads, dim, device="cuda",
                                                          generator=gen), dim=-1).to(dtype)
            v = torch.randn(batch, length, heads, dim, device="cuda", dtype=dtype, generator=gen)
            beta = torch.rand(batch, length, heads, device="cuda", generator=gen).sigmoid().to(dtype)
            do = torch.randn_like(v)
            fla_leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
            tasks = batch * heads

            def ours(t, rows):  # [B, T, H, D] -> [B·H, T, rows, D]
                return t.permute(0, 2, 1, 3).reshape(tasks, length, rows, -1).contiguous()
            mk_leaves = [ours(q * dim ** -0.5, 1), ours(k, 1), ours(v, 1),
                         beta.permute(0, 2, 1).reshape(tasks, length).contiguous(),
                         torch.zeros(tasks, dim, dim, device="cuda", dtype=dtype)]
            mk_leaves = [t.requires_grad_() for t in mk_leaves]
            mk_do = ours(do, 1)

            def run_fla():
                o, _ = chunk_delta_rule(*fla_leaves)
                return o, torch.autograd.grad(o, fla_leaves, do)

            def run_mk(force):
                def run():
                    kernels.set_chunked_knobs(force, 64)
                    try:
                        qq, kk, vv, bb, w0 = mk_leaves
                        out = mk.fast_weight_unroll(w0, kk, vv, bb, queries=qq, backend="triton")
                        return out.readout, torch.autograd.grad(out.readout, mk_leaves, mk_do)
                    finally:
                        kernels.set_chunked_knobs(-1, 64)
                return run

            qq, kk, vv, bb, w0 = mk_leaves
            path = unroll_path(w0, kk, vv, bb, queries=qq, backend="triton")
            err = "n/a"
            fla_ms = "n/a"
            if chunk_delta_rule is not None:
                o_fla, _ = run_fla()
                o_mk, _ = run_mk(-1)()
                err = f"{rel_err(o_mk.reshape(batch, heads, length, dim).transpose(1, 2), o_fla):.1e}"
                fla_ms = cuda_ms(run_fla, args.repeats)
            chunked_ms = cuda_ms(run_mk(1), args.repeats)
            steps_ms = cuda_ms(run_mk(0), args.repeats)
            ratio = f"{chunked_ms / fla_ms:.2f}" if fla_ms != "n/a" else "n/a"
            fla_text = f"{fla_ms:.2f}" if fla_ms != "n/a" else "n/a"
            row = (f"| {label} B={batch} T={length} H={heads} D={dim} | "
                   f"{str(dtype).replace('torch.', '')} | {fla_text} | {chunked_ms:.2f} | "
                   f"{steps_ms:.2f} | {ratio} | {chunked_ms / steps_ms:.2f} | {path} | {err} |")
            lines.append(row)
            print(row, flush=True)
            del fla_leaves, mk_leaves
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
