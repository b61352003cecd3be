"""Reference ``fast_weight_meta_loss`` (docs/ops/fast_weight_meta_loss.md): autograd through the
reference unroll plus the outer (query) loss, in plain PyTorch. The truth the fused backends are
tested against; double backward works.

It takes the public op's arguments, without ``backend`` and ``checkpoint``, unchecked.
:func:`query_loss` is the outer loss alone, on the adapted weights or on the readout: the
reference uses it, and so do the backends that compose their unroll with the loss in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metakernels.reference.fast_weight import _compute_dtype, fast_weight_unroll

REDUCTIONS = ("mean", "sum", "none")


def _row_mean_loss(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """ℓ(Z, Y) of docs/ops/fast_weight_meta_loss.md over the rows (dimension −2) of every leading
    index: mse ``1/(2m) Σ_i ‖z_i − y_i‖²``, ce ``1/m Σ_i −log softmax(z_i)[y_i]``."""
    m = logits.shape[-2]
    if loss == "mse":
        return 0.5 * (logits - targets).pow(2).sum((-2, -1)) / m
    log_probs = torch.log_softmax(logits, dim=-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1) / m


def reduce_tasks(per_task: Tensor, reduction: str) -> Tensor:
    """``[B]`` per-task losses reduced as ``reduction`` says (mean, sum, or none)."""
    if reduction == "mean":
        return per_task.mean() if per_task.numel() else per_task.sum()
    if reduction == "sum":
        return per_task.sum()
    return per_task


def query_loss(weight_t: Tensor, bias_t: Tensor | None, readout: Tensor | None,
               query_x: Tensor, query_y: Tensor, loss: str, reduction: str) -> Tensor:
    """The outer loss: form A (``query_x [B, m, d_in]``) at ``(weight_t, bias_t)``, form B
    (``query_x [B, T, m, d_in]``) on ``readout [B, T, m, d_out]`` summed over steps. Computed in
    float32 (float64 for float64 inputs); returned in ``weight_t``'s dtype."""
    out_dtype = weight_t.dtype
    dtype = _compute_dtype(out_dtype)
    targets = query_y.to(dtype) if loss == "mse" else query_y
    if query_x.dim() == 3:
        logits = query_x.to(dtype) @ weight_t.to(dtype)
        if bias_t is not None:
            logits = logits + bias_t.to(dtype).unsqueeze(1)
        per_task = _row_mean_loss(logits, targets, loss)
    else:
        per_task = _row_mean_loss(readout.to(dtype), targets, loss).sum(1)
    return reduce_tasks(per_task, reduction).to(out_dtype)


def fast_weight_meta_loss(weight: Tensor, x: Tensor, y: Tensor, lr, query_x: Tensor,
                          query_y: Tensor, *, steps: int | None = None, loss: str = "mse",
                          bias: Tensor | None = None, lr_scale: Tensor | None = None,
                          bias_lr_scale: Tensor | None = None, first_order: bool = False,
                          reduction: str = "mean") -> Tensor:
    """The meta-loss: ``[]`` for mean/sum, ``[B]`` for none."""
    form_b = query_x.dim() == 4
    weight_t, bias_t, _, readout = fast_weight_unroll(
        weight, x, y, lr, steps=steps, loss=loss, bias=bias, lr_scale=lr_scale,
        bias_lr_scale=bias_lr_scale, queries=query_x if form_b else None,
        first_order=first_order)
    return query_loss(weight_t, bias_t, readout, query_x, query_y, loss, reduction)
