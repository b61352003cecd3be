"""The checks that come before any timing: every backend against the reference on a small
odd-sized case (docs/conventions.md, accuracy), and every contestant's meta-gradient against the
reference backend's in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import metakernels
from metakernels.benchmarks.configs import MetaProblem
from metakernels.benchmarks.contestants import MetaGrad, get_contestant

# docs/conventions.md, accuracy: norm-wise relative error against the float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# Odd sizes, as the tests use, so no backend is only right at multiples of a block size.
CHECK_SIZES = dict(tasks=3, steps=4, support=5, d_in=7, d_out=6, queries=2)


def relative_error(out: Tensor | None, ref: Tensor | None) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; the absolute error when ``ref`` is zero. A missing
    (None) gradient counts as zeros."""
    if out is None and ref is None:
        return 0.0
    if out is None:
        out = torch.zeros_like(ref)
    if ref is None:
        ref = torch.zeros_like(out)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    ref_norm = ref.norm().item()
    error = (out - ref).norm().item()
    return error / ref_norm if ref_norm > 0 else error


def max_relative_error(outs: dict[str, Tensor | None], refs: dict[str, Tensor | None]) -> float:
    return max(relative_error(outs.get(name), refs.get(name)) for name in refs.keys() | outs.keys())


@dataclass
class BackendCheck:
    """One line of the backend check: ``backend`` against the reference on ``case``."""

    backend: str
    loss: str
    case: str
    max_error: float
    worst: str        # the output or gradient with the largest error
    passed: bool


def _check_inputs(case: str, loss: str, dtype: torch.dtype, device, seed: int) -> dict:
    """The arguments of one fast_weight_unroll call with every option on; float tensors are
    leaves with requires_grad.

    ``"maml"``: shared init ``[d_in, d_out]``, 3-D x with ``steps``, shared bias, lr ``[B, T]``.
    ``"trajectory"``: per-task init ``[B, d_in, d_out]``, 4-D x, per-task bias, lr ``[T]``.
    Both with Meta-SGD scales and a readout.
    """
    gen = torch.Generator().manual_seed(seed)
    s = CHECK_SIZES
    tasks, steps, d_in, d_out = s["tasks"], s["steps"], s["d_in"], s["d_out"]
    per_task = case == "trajectory"
    lead = (tasks, steps, s["support"]) if per_task else (tasks, s["support"])

    def draw(*shape, low=None, high=None):
        if low is None:
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            t = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
        return t.to(device=device, dtype=dtype).requires_grad_()

    if loss == "mse":
        y = draw(*lead, d_out)
    else:
        y = torch.randint(0, d_out, lead, generator=gen).to(device)
    return dict(
        weight=draw(*((tasks,) if per_task else ()), d_in, d_out),
        x=draw(*lead, d_in),
        y=y,
        lr=draw(*((steps,) if per_task else (tasks, steps)), low=0.05, high=0.3),
        steps=None if per_task else steps,
        bias=draw(*((tasks,) if per_task else ()), d_out),
        lr_scale=draw(d_in, d_out, low=0.5, high=1.5),
        bias_lr_scale=draw(d_out, low=0.5, high=1.5),
        queries=draw(tasks, steps, s["queries"], d_in),
    )


def _outputs_and_grads(inputs: dict, loss: str, backend: str, cotangents: dict) -> dict:
    """fast_weight_unroll's outputs, and the gradients of every float input for the fixed
    random cotangents of the differentiable outputs."""
    out = metakernels.fast_weight_unroll(**inputs, loss=loss, backend=backend)
    results = {"out.weight": out.weight, "out.bias": out.bias, "out.losses": out.losses,
               "out.readout": out.readout}
    pulled = sum((results[name] * cot).sum() for name, cot in cotangents.items())
    leaves = {name: t for name, t in inputs.items()
              if isinstance(t, Tensor) and t.requires_grad}
    grads = torch.autograd.grad(pulled, tuple(leaves.values()), allow_unused=True)
    results.update({f"grad.{name}": g for name, g in zip(leaves, grads)})
    return results


def _cotangents(dtype: torch.dtype, device, seed: int) -> dict[str, Tensor]:
    """Fixed random adjoints of W_T ``[B, d_in, d_out]``, b_T ``[B, d_out]`` and the readout
    ``[B, T, m, d_out]``; the losses are detached and get none."""
    gen = torch.Generator().manual_seed(seed)
    s = CHECK_SIZES
    shapes = {"out.weight": (s["tasks"], s["d_in"], s["d_out"]),
              "out.bias": (s["tasks"], s["d_out"]),
              "out.readout": (s["tasks"], s["steps"], s["queries"], s["d_out"])}
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device,
                                                                            dtype=dtype)
            for name, shape in shapes.items()}


def check_backends(device="cpu", dtype: torch.dtype = torch.float64, seed: int = 0,
                   backends: list[str] | None = None) -> list[BackendCheck]:
    """Every available backend (but the reference itself) against the reference backend, for
    both losses and both x layouts: forward outputs and the gradients of all inputs."""
    if backends is None:
        backends = [b for b in metakernels.available_backends(device) if b != "reference"]
    checks = []
    for loss in ("mse", "ce"):
        for case in ("maml", "trajectory"):
            inputs = _check_inputs(case, loss, dtype, device, seed)
            cotangents = _cotangents(dtype, device, seed + 1)
            reference = _outputs_and_grads(inputs, loss, "reference", cotangents)
            for backend in backends:
                try:
                    results = _outputs_and_grads(inputs, loss, backend, cotangents)
                except Exception as error:  # a backend that raises fails its line, not the run
                    checks.append(BackendCheck(backend, loss, case, math.nan,
                                               f"raised {type(error).__name__}: {error}", False))
                    continue
                errors = {name: relative_error(results[name], reference[name])
                          for name in reference}
                # NaN first: it compares false with everything and would hide behind max.
                worst = max(errors, key=lambda name: math.inf if math.isnan(errors[name])
                            else errors[name])
                checks.append(BackendCheck(backend, loss, case, errors[worst], worst,
                                           errors[worst] <= TOLERANCE[dtype]))
    return checks


def reference_meta_grad(problem: MetaProblem) -> MetaGrad:
    """The reference backend's meta-gradient on the same inputs in float64: the truth."""
    return get_contestant("metakernels:reference")(problem.to(torch.float64))

