"""``linear_hvp``: batched Hessian-vector products of the inner loss (docs/ops/linear_hvp.md)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from metakernels import reference
from metakernels._losses import LOSS_CODES
from metakernels.ops import _autocast, _backends, _checks


class HvpOutput(NamedTuple):
    """What :func:`linear_hvp` returns; unpacks as ``hv_weight, hv_bias = linear_hvp(...)``.

    weight: ``[B, d_in, d_out]`` the product's weight part, ``(H v)_W``.
    bias:   ``[B, d_out]`` its bias part, ``(H v)_b``, or None for a model without a bias.
    """

    weight: Tensor
    bias: Optional[Tensor]


@_autocast.autocast_op
def linear_hvp(weight: Tensor, x: Tensor, v: Tensor, *, loss: str = "mse",
               bias: Tensor | None = None, v_bias: Tensor | None = None,
               backend: str = "auto") -> HvpOutput:
    r"""Hessian-vector products of the inner loss of every task, ``Hv = Xᵀ H_E (X V + 1 v_bᵀ)``.

    ``H`` is the Hessian of ℓ (mse or ce, as in :func:`fast_weight_unroll`) with respect to
    (W, b) at (weight, bias); ``H_E = I/n`` for mse and the softmax Jacobian over n for ce.

    Args:
        weight: ``[d_in, d_out]`` shared or ``[B, d_in, d_out]``.
        x: ``[B, n, d_in]``.
        v: ``[B, d_in, d_out]``, the direction for the weight.
        loss: ``"mse"`` or ``"ce"``.
        bias: None, ``[d_out]`` or ``[B, d_out]``; enters the ce Hessian.
        v_bias: None, ``[d_out]`` or ``[B, d_out]``, the direction for the bias (zero when None).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        :class:`HvpOutput` ``(weight [B, d_in, d_out], bias [B, d_out])``; ``bias`` is None when
        both ``bias`` and ``v_bias`` are None (a model without a bias). Differentiable in weight, x,
        v, bias and v_bias.
    """
    for name, value in (("weight", weight), ("x", x), ("v", v)):
        _checks.require_tensor(name, value)
    _checks.require_tensor("bias", bias, optional=True)
    _checks.require_tensor("v_bias", v_bias, optional=True)
    _checks.check_loss(loss)
    dtype = _checks.check_float_dtype(weight, backend)
    if weight.dim() not in (2, 3) or weight.shape[-1] < 1 or weight.shape[-2] < 1:
        raise ValueError(f"weight has shape {_checks.shape_str(weight.shape)}, expected "
                         "[d_in, d_out] (shared) or [B, d_in, d_out] with d_in, d_out >= 1")
    d_in, d_out = weight.shape[-2], weight.shape[-1]
    if x.dim() != 3:
        raise ValueError(f"x has shape {_checks.shape_str(x.shape)}, expected [B, n, d_in]")
    tasks, support = x.shape[0], x.shape[1]
    _checks.check_shape("x", x, (tasks, support, d_in))
    if support < 1:
        raise ValueError(f"x has shape {_checks.shape_str(x.shape)}: n = 0 rows, expected at "
                         "least 1")
    _checks.check_shape("weight", weight, (d_in, d_out), (tasks, d_in, d_out))
    _checks.check_shape("v", v, (tasks, d_in, d_out))
    _checks.check_shape("bias", bias, (d_out,), (tasks, d_out))
    _checks.check_shape("v_bias", v_bias, (d_out,), (tasks, d_out))
    for name, tensor in (("x", x), ("v", v), ("bias", bias), ("v_bias", v_bias)):
        _checks.check_same_dtype(name, tensor, dtype)
        _checks.check_device(name, tensor, weight.device)
    with_bias = bias is not None or v_bias is not None

    which = _backends.resolve(backend, weight.device, dtype)
    if which == "reference":
        return HvpOutput(*reference.linear_hvp(weight, x, v, loss=loss, bias=bias,
                                               v_bias=v_bias))
    hv_weight, hv_bias = torch.ops.metakernels.linear_hvp(weight, x, v, bias, v_bias,
                                                          LOSS_CODES[loss], with_bias, which)
    return HvpOutput(hv_weight, hv_bias if with_bias else None)


@torch.library.custom_op("metakernels::linear_hvp", mutates_args=())
def _hvp(weight: Tensor, x: Tensor, v: Tensor, bias: Optional[Tensor], v_bias: Optional[Tensor],
         loss: int, with_bias: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (Hv_weight, Hv_bias or [0]) from the kernels of compiled backend ``backend``."""
    return tuple(_backends.kernels(backend).linear_hvp(weight, x, v, bias, v_bias, loss,
                                                       with_bias))


@_hvp.register_fake
def _hvp_fake(weight, x, v, bias, v_bias, loss, with_bias, backend):
    tasks, d_in, d_out = x.shape[0], weight.shape[-2], weight.shape[-1]
    return (weight.new_empty(tasks, d_in, d_out),
            weight.new_empty(tasks, d_out) if with_bias else weight.new_empty(0))


def _hvp_setup_context(ctx, inputs, output):
    weight, x, v, bias, v_bias, loss, with_bias, _ = inputs
    ctx.save_for_backward(weight, x, v, bias, v_bias)
    ctx.loss, ctx.with_bias = loss, with_bias


def _hvp_backward(ctx, grad_hv_weight, grad_hv_bias):
    # Hv is bilinear in (x, v) for mse and smooth in weight for ce: its vector-Jacobian product
    # is the reference's, through torch.func, so no third-derivative kernel is needed.
    primals = ctx.saved_tensors
    present = [i for i, t in enumerate(primals) if t is not None]
    loss = "ce" if ctx.loss == LOSS_CODES["ce"] else "mse"

    def hvp_of(*tensors):
        args = list(primals)
        for i, t in zip(present, tensors):
            args[i] = t
        weight, x, v, bias, v_bias = args
        hv_weight, hv_bias = reference.linear_hvp(weight, x, v, loss=loss, bias=bias,
                                                  v_bias=v_bias)
        return (hv_weight, hv_bias) if ctx.with_bias else (hv_weight,)

    _, vjp = torch.func.vjp(hvp_of, *[primals[i] for i in present])
    cotangents = (grad_hv_weight, grad_hv_bias) if ctx.with_bias else (grad_hv_weight,)
    grads = [None] * 5
    for i, g in zip(present, vjp(cotangents)):
        grads[i] = g if ctx.needs_input_grad[i] else None
    return tuple(grads) + (None, None, None)


_hvp.register_autograd(_hvp_backward, setup_context=_hvp_setup_context)
