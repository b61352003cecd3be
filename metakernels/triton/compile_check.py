"""Compile the Triton kernels for a GPU target without a GPU: the launchers run on ``meta``
tensors inside :func:`metakernels.triton._launch.compile_only`, so each launch is compiled (Triton's
compiler and ptxas) and nothing runs. Used by tests/test_triton_compile.py and
bench/gpu/triton_compile_check.py."""

from __future__ import annotations

import torch

from metakernels._losses import LOSS_CODES
from metakernels.triton import linear_hvp, unroll_backward, unroll_forward


def _meta(tensor, dtype):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    target = dtype if tensor.dtype.is_floating_point else tensor.dtype
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=target, device="meta")


def compile_unroll(inputs: dict, dtype: torch.dtype, *, loss: str = "mse",
                   first_order: bool = False, store_states: bool = True) -> None:
    """Every kernel launch of one forward and one backward on ``inputs`` (the keyword arguments
    of :func:`metakernels.fast_weight_unroll`: weight, x, y, lr and the optional ones, any
    device; only their shapes, strides and dtypes count), every gradient wanted."""
    inputs = {k: _meta(v, dtype) for k, v in inputs.items() if v is not None}
    tasks = inputs["x"].shape[0]
    steps = inputs["x"].shape[1] if inputs["x"].dim() == 4 else inputs["steps"]
    lr = inputs["lr"]
    lr = (torch.empty(tasks, steps, dtype=dtype, device="meta") if not isinstance(lr, torch.Tensor)
          else lr.broadcast_to((tasks, steps)))
    code = LOSS_CODES[loss]
    args = [inputs["weight"], inputs["x"], inputs["y"], lr, inputs.get("bias"),
            inputs.get("lr_scale"), inputs.get("bias_lr_scale"), inputs.get("queries")]
    weight_t, bias_t, _, readout, residual, states = unroll_forward(*args, code, store_states)
    wanted = [True, not first_order, loss == "mse" and not first_order, True] + [
        a is not None for a in args[4:]]
    unroll_backward(*args, residual, states, weight_t, torch.empty_like(weight_t),
                    torch.empty_like(bias_t) if args[4] is not None else None,
                    torch.empty_like(readout) if args[7] is not None else None, code,
                    first_order, wanted)


def compile_linear_hvp(loss: str, *, tasks: int, support: int, d_in: int, d_out: int,
                       dtype: torch.dtype) -> None:
    """The launch of one linear_hvp call with a per-task bias and bias direction."""
    def meta(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")
    linear_hvp(meta(d_in, d_out), meta(tasks, support, d_in), meta(tasks, d_in, d_out),
               meta(tasks, d_out), meta(tasks, d_out), LOSS_CODES[loss], True)
