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


def compile_mlp(widths, dtype: torch.dtype, *, tasks: int, steps: int, support: int,
                rows: int = 0, per_step: bool = False, loss: str = "mse", activation: int = 0,
                bias: bool = True, lr_scale: bool = False, meta: str = "",
                first_order: bool = False, stride: int = 1) -> None:
    """Every kernel launch of one MLP forward and backward (mlp_forward / mlp_backward) at these
    sizes, every gradient wanted: unroll mode with ``rows`` readout rows, or meta-loss form
    ``meta`` ("A" or "B")."""
    from metakernels.triton import mlp_backward, mlp_forward

    def meta_t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")
    L = len(widths) - 1
    weights = [meta_t(tasks, widths[l], widths[l + 1]) for l in range(L)]
    biases = [meta_t(tasks, widths[l + 1]) for l in range(L)] if bias else []
    lead = (tasks, steps, support) if per_step else (tasks, support)
    x = meta_t(*lead, widths[0])
    y = meta_t(*lead, widths[-1]) if loss == "mse" else meta_t(*lead, dt=torch.int64)
    scales = [meta_t(widths[l], widths[l + 1]) for l in range(L)] if lr_scale else []
    query_y = None
    if meta:
        q_lead = (tasks, steps, rows) if meta == "B" else (tasks, rows)
        queries = meta_t(*q_lead, widths[0])
        query_y = (meta_t(*q_lead, widths[-1]) if loss == "mse"
                   else meta_t(*q_lead, dt=torch.int64))
    else:
        queries = meta_t(tasks, steps, rows, widths[0]) if rows else None
    args = (weights, biases, x, y, meta_t(tasks, steps), scales, queries, query_y)
    code = LOSS_CODES[loss]
    out = mlp_forward(*args, activation, code, stride)
    states, finals = out[2], out[3:]
    grad_out = (meta_t(tasks) if meta else meta_t(tasks, steps, rows, widths[-1]) if rows
                else None)
    mlp_backward(*args, states, finals[:L], finals[L:], [torch.empty_like(w) for w in
                                                         finals[:L]],
                 [torch.empty_like(b) for b in finals[L:]], grad_out, activation, code, stride,
                 first_order, [True] * 8)
