"""Reference ``fast_weight_mlp_unroll`` and ``fast_weight_mlp_meta_loss``
(docs/ops/fast_weight_mlp.md): the inner loop of an L-layer perceptron whose every layer adapts,
written as a plain unrolled loop; the inner gradient comes from ``torch.autograd.grad`` with
``create_graph`` (unless ``first_order``), so the second-order meta-gradient is autograd's own
and double backward works. The truth the fused backends are tested against.

The functions take the public signatures (defaults included, ``backend`` aside) and accept what
the public ops accept: ``lr`` a float or a tensor broadcastable to ``[B, T]``, shared
(``[d_l, d_{l+1}]``) or per-task (``[B, d_l, d_{l+1}]``) layers mixed, lists or tuples. They do not
check their arguments (:mod:`metakernels.ops` does). ``checkpoint`` is accepted and ignored.

Computed in float32 (float64 for float64 inputs); outputs in the dtype of ``weights[0]``.
Memory: autograd keeps every step's activations and the graph of every inner gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from metakernels.reference.fast_weight import _compute_dtype
from metakernels.reference.meta_loss import _row_mean_loss, reduce_tasks

ACTIVATIONS = ("relu", "tanh", "gelu", "silu")


class MLPUnrollOutput(NamedTuple):
    """What ``fast_weight_mlp_unroll`` returns.

    weights: L tensors ``[B, d_l, d_{l+1}]``: θ_T, layer by layer.
    biases:  L tensors ``[B, d_{l+1}]``, or None without biases.
    losses:  ``[B, T]`` the inner loss at θ_t before step t; detached.
    readout: ``[B, T, m, d_L]`` the network at θ_{t+1} on ``queries[:, t]``, or None.
    """

    weights: tuple
    biases: Optional[tuple]
    losses: Tensor
    readout: Optional[Tensor]


def activate(pre: Tensor, activation: str) -> Tensor:
    """σ(A): relu, tanh, gelu (the erf form, as ``F.gelu``) or silu."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "tanh":
        return torch.tanh(pre)
    if activation == "gelu":
        return F.gelu(pre)
    return F.silu(pre)


def mlp_apply(weights, biases, inputs: Tensor, activation: str) -> Tensor:
    """The network on ``inputs [B, rows, d_0]`` (or ``[B, T, rows, d_0]`` with per-task layers
    broadcast over T): ``A_l = H_l W_l + 1 b_lᵀ``, ``H_{l+1} = σ(A_l)``, no σ after the last."""
    hidden = inputs
    for layer, weight in enumerate(weights):
        if inputs.dim() == 4:
            hidden = hidden @ weight.unsqueeze(1)
            if biases is not None:
                hidden = hidden + biases[layer][:, None, None, :]
        else:
            hidden = hidden @ weight
            if biases is not None:
                hidden = hidden + biases[layer].unsqueeze(1)
        if layer < len(weights) - 1:
            hidden = activate(hidden, activation)
    return hidden


def _normalised_lr(lr, tasks: int, steps: int, dtype, device) -> Tensor:
    if not isinstance(lr, Tensor):
        lr = torch.tensor(float(lr), dtype=dtype, device=device)
    return lr.to(dtype).broadcast_to((tasks, steps))


def fast_weight_mlp_unroll(weights, biases, x: Tensor, y: Tensor, lr, *,
                           steps: int | None = None, activation: str = "relu",
                           loss: str = "mse", lr_scale=None, queries: Tensor | None = None,
                           first_order: bool = False,
                           checkpoint: bool | None = None) -> MLPUnrollOutput:
    """T steps of SGD on every layer of the MLP, for B tasks; see docs/ops/fast_weight_mlp.md."""
    out_dtype = weights[0].dtype
    dtype = _compute_dtype(out_dtype)
    tasks = x.shape[0]
    per_step = x.dim() == 4
    steps = x.shape[1] if per_step else steps
    layers = len(weights)
    fast_w = [w.to(dtype).expand(tasks, w.shape[-2], w.shape[-1]) for w in weights]
    fast_b = (None if biases is None
              else [b.to(dtype).expand(tasks, b.shape[-1]) for b in biases])
    scales = None if lr_scale is None else [s.to(dtype) for s in lr_scale]
    lr = _normalised_lr(lr, tasks, steps, dtype, x.device)
    x = x.to(dtype)
    y = y.to(dtype) if loss == "mse" else y
    queries = None if queries is None else queries.to(dtype)
    outer_grad = torch.is_grad_enabled()

    losses, readouts = [], []
    for t in range(steps):
        x_t = x[:, t] if per_step else x
        y_t = y[:, t] if per_step else y
        with torch.enable_grad():
            # Leaves where nothing upstream records a gradient (or no outer gradient is
            # recorded at all), so that the inner gradient exists in every grad mode.
            params = [p if outer_grad and p.requires_grad else p.detach().requires_grad_()
                      for p in fast_w + (fast_b or [])]
            w_t, b_t = params[:layers], (params[layers:] if fast_b is not None else None)
            step_loss = _row_mean_loss(mlp_apply(w_t, b_t, x_t, activation), y_t, loss)
            grads = torch.autograd.grad(step_loss.sum(), params,
                                        create_graph=outer_grad and not first_order)
        losses.append(step_loss.detach())
        if not outer_grad:
            w_t = [w.detach() for w in w_t]
            b_t = None if b_t is None else [b.detach() for b in b_t]
        step = lr[:, t]
        fast_w = [w - step[:, None, None] * (g if scales is None else scales[i] * g)
                  for i, (w, g) in enumerate(zip(w_t, grads[:layers]))]
        if fast_b is not None:
            fast_b = [b - step[:, None] * g for b, g in zip(b_t, grads[layers:])]
        if queries is not None:
            readouts.append(mlp_apply(fast_w, fast_b, queries[:, t], activation))

    losses_out = (torch.stack(losses, 1) if losses else x.new_zeros(tasks, 0)).to(out_dtype)
    readout = None if queries is None else torch.stack(readouts, 1).to(out_dtype)
    return MLPUnrollOutput(tuple(w.to(out_dtype) for w in fast_w),
                           None if fast_b is None else tuple(b.to(out_dtype) for b in fast_b),
                           losses_out, readout)


def fast_weight_mlp_meta_loss(weights, biases, x: Tensor, y: Tensor, lr, query_x: Tensor,
                              query_y: Tensor, *, steps: int | None = None,
                              activation: str = "relu", loss: str = "mse", lr_scale=None,
                              first_order: bool = False, reduction: str = "mean",
                              checkpoint: bool | None = None) -> Tensor:
    """The meta-loss, ``[]`` for mean/sum and ``[B]`` for none: form A (``query_x [B, m, d_0]``)
    the outer loss of the network at θ_T; form B (``query_x [B, T, m, d_0]``) the readout loss
    after every step, summed over steps."""
    form_b = query_x.dim() == 4
    if form_b and x.dim() == 3 and steps is None:
        steps = query_x.shape[1]
    out = fast_weight_mlp_unroll(weights, biases, x, y, lr, steps=steps, activation=activation,
                                 loss=loss, lr_scale=lr_scale,
                                 queries=query_x if form_b else None, first_order=first_order)
    dtype = _compute_dtype(weights[0].dtype)
    targets = query_y.to(dtype) if loss == "mse" else query_y
    if form_b:
        per_task = _row_mean_loss(out.readout.to(dtype), targets, loss).sum(1)
    else:
        weights_t = [w.to(dtype) for w in out.weights]
        biases_t = None if out.biases is None else [b.to(dtype) for b in out.biases]
        logits = mlp_apply(weights_t, biases_t, query_x.to(dtype), activation)
        per_task = _row_mean_loss(logits, targets, loss)
    return reduce_tasks(per_task, reduction).to(weights[0].dtype)
