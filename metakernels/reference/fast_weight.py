"""Reference implementations of ``fast_weight_unroll`` and ``linear_hvp``
(docs/ops/fast_weight_unroll.md, docs/ops/linear_hvp.md).

Plain PyTorch: the unrolled loop is an ordinary autograd graph, so the second-order
meta-gradient comes from autograd itself and double backward works. The inner gradient is
written in closed form (``G_t = X_tᵀ E_t``), which is the definition in
docs/ops/fast_weight_unroll.md; the tests check it against autograd-derived inner gradients
(``torch.func``, ``higher``, ``torchopt``).

Each function takes the arguments of the public op of the same name (docs/ops/), without
``backend`` and ``checkpoint``, so a test or a user can swap one for the other; the arguments are
not checked (the public op checks them before it calls these). The state and every accumulation are
float32 (float64 for float64 inputs); outputs take the dtype of ``weight``.

Memory: autograd stores every step's activations, O(B·T·(d_in·d_out + n·d_out)).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _loss_and_residual(logits: Tensor, targets: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Per-task inner loss ``[B]`` and residual ``E = ∂ℓ/∂Z`` ``[B, n, d_out]``."""
    n = logits.shape[-2]
    if loss == "mse":
        diff = logits - targets
        return 0.5 * diff.pow(2).sum((-2, -1)) / n, diff / n
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # scatter, not F.one_hot, which may read the labels' range back to the host on a GPU.
    onehot = torch.zeros_like(logits).scatter(-1, targets.unsqueeze(-1), 1.0)
    return -picked.sum(-1) / n, (log_probs.exp() - onehot) / n


def lr_per_step(lr, tasks: int, steps: int, like: Tensor) -> Tensor:
    """``lr`` (a float, or a tensor broadcastable to ``[B, T]``) as a ``[B, T]`` tensor."""
    if not isinstance(lr, Tensor):
        lr = torch.tensor(float(lr), dtype=like.dtype, device=like.device)
    return lr.broadcast_to((tasks, steps))


def fast_weight_unroll(weight: Tensor, x: Tensor, y: Tensor, lr, *, steps: int | None = None,
                       loss: str = "mse", bias: Tensor | None = None,
                       lr_scale: Tensor | None = None, bias_lr_scale: Tensor | None = None,
                       queries: Tensor | None = None, first_order: bool = False):
    """Returns ``(weight_T [B, d_in, d_out], bias_T [B, d_out] | None, losses [B, T],
    readout [B, T, m, d_out] | None)``. ``steps`` is T for 3-D x (ignored for 4-D x)."""
    out_dtype = weight.dtype
    dtype = _compute_dtype(out_dtype)
    tasks, d_in, d_out = x.shape[0], weight.shape[-2], weight.shape[-1]
    if x.dim() == 4:
        steps = x.shape[1]
    lr = lr_per_step(lr, tasks, steps, weight)
    per_step = x.dim() == 4
    fast_weight = weight.to(dtype).expand(tasks, d_in, d_out)
    fast_bias = None if bias is None else bias.to(dtype).expand(tasks, d_out)
    x, lr, lr_scale, bias_lr_scale, queries = (
        _up(t, dtype) for t in (x, lr, lr_scale, bias_lr_scale, queries))
    y = y.to(dtype) if loss == "mse" else y

    losses, readouts = [], []
    for t in range(steps):
        x_t = x[:, t] if per_step else x
        y_t = y[:, t] if per_step else y
        logits = x_t @ fast_weight
        if fast_bias is not None:
            logits = logits + fast_bias.unsqueeze(1)
        step_loss, residual = _loss_and_residual(logits, y_t, loss)
        losses.append(step_loss.detach())
        inner_grad = x_t.transpose(1, 2) @ residual
        if first_order:
            inner_grad = inner_grad.detach()
        if lr_scale is not None:
            inner_grad = lr_scale * inner_grad
        fast_weight = fast_weight - lr[:, t, None, None] * inner_grad
        if fast_bias is not None:
            bias_grad = residual.sum(1)
            if first_order:
                bias_grad = bias_grad.detach()
            if bias_lr_scale is not None:
                bias_grad = bias_lr_scale * bias_grad
            fast_bias = fast_bias - lr[:, t, None] * bias_grad
        if queries is not None:
            readout = queries[:, t] @ fast_weight
            if fast_bias is not None:
                readout = readout + fast_bias.unsqueeze(1)
            readouts.append(readout)

    losses_out = (torch.stack(losses, 1) if losses else x.new_zeros(tasks, 0)).to(out_dtype)
    readout_out = None
    if queries is not None:
        readout_out = torch.stack(readouts, 1).to(out_dtype)
    bias_out = None if fast_bias is None else fast_bias.to(out_dtype)
    return fast_weight.to(out_dtype), bias_out, losses_out, readout_out


def linear_hvp(weight: Tensor, x: Tensor, v: Tensor, *, loss: str = "mse",
               bias: Tensor | None = None, v_bias: Tensor | None = None):
    """Returns ``(Hv_weight [B, d_in, d_out], Hv_bias [B, d_out] | None)``:
    ``Hv = Xᵀ H_E (X V + 1 v_bᵀ)`` with ``H_E`` the Hessian of the loss in the logits;
    ``Hv_bias`` is None when both ``bias`` and ``v_bias`` are."""
    with_bias = bias is not None or v_bias is not None
    out_dtype = weight.dtype
    dtype = _compute_dtype(out_dtype)
    x, v, v_bias = (_up(t, dtype) for t in (x, v, v_bias))
    n = x.shape[1]
    pushed = x @ v
    if v_bias is not None:
        pushed = pushed + v_bias.unsqueeze(-2)
    if loss == "mse":
        z_adj = pushed / n
    else:
        logits = x @ weight.to(dtype)
        if bias is not None:
            logits = logits + bias.to(dtype).unsqueeze(-2)
        probs = torch.softmax(logits, dim=-1)
        z_adj = probs * (pushed - (probs * pushed).sum(-1, keepdim=True)) / n
    hv_weight = (x.transpose(1, 2) @ z_adj).to(out_dtype)
    hv_bias = z_adj.sum(1).to(out_dtype) if with_bias else None
    return hv_weight, hv_bias
