"""A tiny standalone run of every CUDA kernel, forward and backward, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python bench/gpu/sanitize_case.py
    compute-sanitizer --tool racecheck python bench/gpu/sanitize_case.py

Small odd shapes (both losses, 3-D and 4-D x, readout, bias, lr_scale, per-task and shared init,
one shape too big for shared memory, which takes the global-memory workspace path, and
fragment-aligned shapes for the tensor-core kernels, with d_out split over CTAs too), each
checked against the float64 reference; exits non-zero on a mismatch. Outputs are NaN-poisoned
first, so an unwritten element is a mismatch too. Runs in seconds without the sanitizer.
"""

from __future__ import annotations

import sys

import torch

import metakernels as mk
from metakernels.ops import _backends

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).norm().item()
    if diff != diff:
        return float("inf")
    scale = want.norm().item()
    return diff / scale if scale > 0 else diff


def unroll_case(loss, per_step, dtype, B=3, T=3, n=5, d_in=7, d_out=6, m=2, seed=0,
                lr_scale=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).cuda()

    lead = (B, T, n) if per_step else (B, n)
    kwargs = dict(weight=randn(B, d_in, d_out, scale=d_in ** -0.5),
                  x=randn(*lead, d_in, scale=d_in ** -0.5),
                  lr=(0.2 + 0.4 * torch.rand(B, T, generator=gen, dtype=torch.float64)).to(dtype).cuda(),
                  bias=randn(d_out), lr_scale=(0.5 + torch.rand(d_in, d_out, generator=gen,
                                                                 dtype=torch.float64)).to(dtype).cuda(),
                  bias_lr_scale=(0.5 + torch.rand(d_out, generator=gen, dtype=torch.float64)).to(dtype).cuda(),
                  queries=randn(B, T, m, d_in), loss=loss)
    if loss == "mse":
        kwargs["y"] = randn(*lead, d_out)
    else:
        kwargs["y"] = torch.randint(0, d_out, lead, generator=gen).cuda()
    if not per_step:
        kwargs["steps"] = T
    if not lr_scale:
        del kwargs["lr_scale"]
    return kwargs


def run(kwargs, backend, dtype, only=None):
    """Outputs and gradients; `only` names the differentiable inputs (default: every floating
    one), the others are passed in `dtype` without gradients."""
    floating = {k: v.detach().to(dtype) for k, v in kwargs.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()}
    leaves = {k: v.requires_grad_() for k, v in floating.items() if only is None or k in only}
    call = dict(kwargs, **floating)
    out = mk.fast_weight_unroll(**call, backend=backend)
    gen = torch.Generator().manual_seed(1)
    outputs = [out.weight, out.bias, out.readout]
    cots = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype).cuda() for t in outputs]
    grads = torch.autograd.grad(outputs, list(leaves.values()), cots, allow_unused=True)
    result = {"weight": out.weight, "bias": out.bias, "losses": out.losses, "readout": out.readout}
    result.update({f"grad_{k}": g for k, g in zip(leaves, grads)})
    return result


def main() -> int:
    cuda = _backends._module("cuda")[0]
    if cuda is None:
        print(f"metakernels._C_cuda is not built: {_backends._module('cuda')[1]}")
        return 1
    cuda.set_poison_outputs(True)
    failures = 0
    cases = [(loss, per_step, dtype, {}, None) for loss in ("mse", "ce")
             for per_step in (False, True) for dtype in (torch.float32, torch.bfloat16)]
    cases.append(("mse", True, torch.float32, dict(B=2, T=2, n=3, d_in=240, d_out=241, m=1), None))
    # The tensor-core kernels (every size a multiple of 16, no lr_scale): one CTA per task, and
    # (mse with only weight, bias and y differentiable) d_out split over several CTAs per task.
    mma = dict(B=2, T=2, n=16, d_in=32, d_out=64, m=16, lr_scale=False)
    cases += [("mse", True, torch.float32, mma, None), ("ce", False, torch.bfloat16, mma, None),
              ("mse", True, torch.float32, mma, ("weight", "bias", "y")),
              ("mse", False, torch.float16, mma, ("weight", "bias"))]
    for loss, per_step, dtype, size, only in cases:
        kwargs = unroll_case(loss, per_step, dtype, **size)
        got = run(kwargs, "cuda", dtype, only)
        want = run(kwargs, "reference", torch.float64, only)
        for key, w in want.items():
            if w is None:
                continue
            err = rel_err(got[key], w)
            ok = err <= TOL[dtype]
            failures += not ok
            if not ok:
                print(f"FAIL unroll {loss} x{'4' if per_step else '3'}d {dtype} {size} {only} "
                      f"{key}: relative error {err:.3e}")
    for loss in ("mse", "ce"):
        gen = torch.Generator().manual_seed(2)
        w = torch.randn(4, 7, 6, generator=gen, dtype=torch.float64).cuda()
        x = torch.randn(4, 5, 7, generator=gen, dtype=torch.float64).cuda()
        v = torch.randn(4, 7, 6, generator=gen, dtype=torch.float64).cuda()
        b = torch.randn(6, generator=gen, dtype=torch.float64).cuda()
        vb = torch.randn(4, 6, generator=gen, dtype=torch.float64).cuda()
        got = mk.linear_hvp(w.float(), x.float(), v.float(), loss=loss, bias=b.float(),
                            v_bias=vb.float(), backend="cuda")
        want = mk.linear_hvp(w, x, v, loss=loss, bias=b, v_bias=vb, backend="reference")
        for name, g, r in zip(("hv_weight", "hv_bias"), got, want):
            err = rel_err(g, r)
            failures += not err <= 1e-4
            if not err <= 1e-4:
                print(f"FAIL linear_hvp {loss} {name}: relative error {err:.3e}")
    torch.cuda.synchronize()
    print(f"sanitize_case: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
