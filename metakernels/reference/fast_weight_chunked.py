"""The chunked (WY/UT) form of ``fast_weight_unroll`` in plain PyTorch: the spec of the chunked
kernels (``csrc/cpu/fast_weight_chunked.cpp``, ``metakernels/triton/fast_weight_chunked.py``),
as flash-linear-attention's ``naive.py`` is beside its kernels. The maths: README.md, "The
chunked form".

It covers what the chunked path accepts: mse, 4-D x ``[B, T, n, d_in]``, no ``lr_scale``, and
``bias_lr_scale`` absent or all ones (then the bias folds into the weights as a column of ones of
x, ``X̃ = [X 1]``). Per chunk of C steps, with S the weights at the chunk's start, K its stacked
rows (Cn × D), ``β_r = η_{t(r)} / n`` and M the block-strictly-lower mask (row r sees the rows
of earlier steps only)::

    L = I + M ∘ (K Kᵀ) diag(β)      L R = K S − Y      E = R / n
    S′ = S − Kᵀ diag(β) R           O = Q̃ S − (N ∘ (Q̃ Kᵀ)) diag(β) R

:func:`fast_weight_unroll_chunked` is that forward as an autograd graph (its gradients are the
reference's, by autograd through the chunked form); :func:`chunked_backward` is the reverse
mode written out, as the kernels run it, and the tests hold it to autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from metakernels.reference.fast_weight import _compute_dtype


class ChunkRows(NamedTuple):
    """One chunk of every task, its steps' rows stacked: ``keys`` K ``[B, Cn, D]`` (x with a
    column of ones where there is a bias), ``targets`` Y ``[B, Cn, d_out]``, ``beta``
    ``[B, Cn]`` (η of the row's step over n), ``queries`` Q̃ ``[B, Cm, D]`` or None, and the masks
    ``earlier`` M ``[Cn, Cn]`` (the row's step is later than the column's) and ``seen`` N
    ``[Cm, Cn]`` (the query's step is not earlier than the row's)."""

    keys: Tensor
    targets: Tensor
    beta: Tensor
    queries: Tensor | None
    earlier: Tensor
    seen: Tensor | None


def with_ones(t: Tensor, has_bias: bool) -> Tensor:
    """``[t 1]``: a column of ones appended to the last dimension where there is a bias."""
    if not has_bias:
        return t
    return torch.cat([t, t.new_ones(t.shape[:-1] + (1,))], -1)


def chunk_rows(x: Tensor, y: Tensor, lr: Tensor, queries: Tensor | None, start: int, stop: int,
               has_bias: bool) -> ChunkRows:
    """The rows of steps ``[start, stop)`` (x ``[B, T, n, d_in]``, y ``[B, T, n, d_out]``, lr
    ``[B, T]``, queries ``[B, T, m, d_in]`` or None), stacked as :class:`ChunkRows`."""
    tasks, _, n, _ = x.shape
    length = stop - start
    keys = with_ones(x[:, start:stop], has_bias).reshape(tasks, length * n, -1)
    targets = y[:, start:stop].reshape(tasks, length * n, -1)
    beta = (lr[:, start:stop] / n).repeat_interleave(n, 1)
    row_step = torch.arange(length, device=x.device).repeat_interleave(n)
    earlier = row_step[:, None] > row_step[None, :]
    chunk_queries, seen = None, None
    if queries is not None:
        m = queries.shape[2]
        chunk_queries = with_ones(queries[:, start:stop], has_bias).reshape(tasks, length * m, -1)
        query_step = torch.arange(length, device=x.device).repeat_interleave(m)
        seen = query_step[:, None] >= row_step[None, :]
    return ChunkRows(keys, targets, beta, chunk_queries, earlier, seen)


def chunk_system(rows: ChunkRows) -> tuple[Tensor, Tensor]:
    """``(L, G)``: the unit lower triangular ``L = I + M ∘ G diag(β)`` and ``G = K Kᵀ``."""
    gram = rows.keys @ rows.keys.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return eye + rows.earlier * gram * rows.beta[:, None, :], gram


def chunk_forward(state: Tensor, rows: ChunkRows, first_order: bool = False):
    """One chunk from its start ``state`` S ``[B, D, d_out]``: ``(R [B, Cn, d_out], S′, O or
    None)``. ``first_order`` detaches the inner gradient (K and R where they update the
    weights), as the step loop detaches ``G_t``."""
    system, _ = chunk_system(rows)
    residual = torch.linalg.solve_triangular(
        system, rows.keys @ state - rows.targets, upper=False, unitriangular=True)
    keys, update = rows.keys, residual
    if first_order:
        keys, update = keys.detach(), update.detach()
    weighted = rows.beta[:, :, None] * update
    next_state = state - keys.transpose(1, 2) @ weighted
    readout = None
    if rows.queries is not None:
        mixing = rows.seen * (rows.queries @ keys.transpose(1, 2))
        readout = rows.queries @ state - mixing @ weighted
    return residual, next_state, readout


def chunk_starts(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Tensor | None,
                 queries: Tensor | None, chunk: int):
    """Runs the chunks; returns ``(the start state S of each chunk and the final one, a list of
    C + 1 [B, D, d_out] tensors; R [B, T, n, d_out]; readout [B, T, m, d_out] or None)`` with
    no autograd (the backward's first sweep)."""
    tasks, steps, n, _ = x.shape
    has_bias = bias is not None
    state = weight.expand(tasks, *weight.shape[-2:])
    if has_bias:
        state = torch.cat([state, bias.expand(tasks, bias.shape[-1])[:, None]], 1)
    starts, residuals, readouts = [state], [], []
    for start in range(0, steps, chunk):
        stop = min(start + chunk, steps)
        rows = chunk_rows(x, y, lr, queries, start, stop, has_bias)
        residual, state, readout = chunk_forward(state, rows)
        starts.append(state)
        residuals.append(residual.reshape(tasks, stop - start, n, -1))
        if readout is not None:
            readouts.append(readout.reshape(tasks, stop - start, queries.shape[2], -1))
    return starts, torch.cat(residuals, 1), (torch.cat(readouts, 1) if readouts else None)


def fast_weight_unroll_chunked(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, *,
                               bias: Tensor | None = None, queries: Tensor | None = None,
                               first_order: bool = False, chunk: int = 16):
    """The chunked form of the reference ``fast_weight_unroll`` (mse, 4-D x, no lr_scale):
    ``(weight_T [B, d_in, d_out], bias_T [B, d_out] | None, losses [B, T],
    readout [B, T, m, d_out] | None)``, differentiable by autograd. lr is ``[B, T]``."""
    out_dtype = weight.dtype
    dtype = _compute_dtype(out_dtype)
    weight, x, y, lr = (t.to(dtype) for t in (weight, x, y, lr))
    bias = None if bias is None else bias.to(dtype)
    queries = None if queries is None else queries.to(dtype)
    tasks, steps, n, d_in = x.shape
    has_bias = bias is not None
    state = weight.expand(tasks, d_in, weight.shape[-1])
    if has_bias:
        state = torch.cat([state, bias.expand(tasks, bias.shape[-1])[:, None]], 1)
    losses, readouts = [], []
    for start in range(0, steps, chunk):
        stop = min(start + chunk, steps)
        rows = chunk_rows(x, y, lr, queries, start, stop, has_bias)
        residual, state, readout = chunk_forward(state, rows, first_order)
        per_step = residual.detach().reshape(tasks, stop - start, n, -1)
        losses.append(0.5 * per_step.pow(2).sum((-2, -1)) / n)
        if readout is not None:
            readouts.append(readout.reshape(tasks, stop - start, queries.shape[2], -1))
    weight_t = state[:, :d_in].to(out_dtype)
    bias_t = state[:, d_in].to(out_dtype) if has_bias else None
    readout_out = torch.cat(readouts, 1).to(out_dtype) if readouts else None
    return weight_t, bias_t, torch.cat(losses, 1).to(out_dtype), readout_out


def chunked_backward(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Tensor | None,
                     queries: Tensor | None, grad_weight_t: Tensor, grad_bias_t: Tensor | None,
                     grad_readout: Tensor | None, *, first_order: bool = False,
                     chunk: int = 16) -> dict:
    """The reverse mode of the chunked form written out (README.md, "The chunked form"): the
    gradients ``{"weight", "x", "y", "lr", "bias", "queries"}`` (per task ``[B, ...]``; a
    shared weight or bias is summed here over tasks; x and y are None in first order; bias and
    queries None where absent), given the adjoints of W_T, b_T and the readout. Plain tensors,
    no autograd: this is the algorithm the kernels run, chunk by chunk from the last."""
    dtype = _compute_dtype(weight.dtype)
    weight, x, y, lr, grad_weight_t = (t.to(dtype) for t in (weight, x, y, lr, grad_weight_t))
    bias, queries, grad_bias_t, grad_readout = (
        None if t is None else t.to(dtype) for t in (bias, queries, grad_bias_t, grad_readout))
    tasks, steps, n, d_in = x.shape
    d_out = weight.shape[-1]
    has_bias = bias is not None
    starts, residual_all, _ = chunk_starts(weight, x, y, lr, bias, queries, chunk)
    # Ŝ′ of the last chunk: (Ŵ_T; b̂_T).
    state_adj = grad_weight_t
    if has_bias:
        last = grad_bias_t if grad_bias_t is not None else grad_weight_t.new_zeros(tasks, d_out)
        state_adj = torch.cat([state_adj, last[:, None]], 1)
    grad_x = x.new_empty(x.shape)
    grad_y = y.new_empty(y.shape)
    grad_lr = lr.new_empty(lr.shape)
    grad_queries = None if queries is None else queries.new_empty(queries.shape)
    for index in reversed(range(len(starts) - 1)):
        start = index * chunk
        stop = min(start + chunk, steps)
        rows = chunk_rows(x, y, lr, queries, start, stop, has_bias)
        state = starts[index]
        residual = residual_all[:, start:stop].reshape(tasks, (stop - start) * n, d_out)
        keys, beta = rows.keys, rows.beta
        pushed = keys @ state_adj                                          # K Ŝ′
        residual_adj = -beta[:, :, None] * pushed                          # R̂
        beta_adj = -(pushed * residual).sum(-1)                            # β̂
        keys_adj = -beta[:, :, None] * (residual @ state_adj.transpose(1, 2))
        new_adj = state_adj
        if rows.queries is not None:
            readout_adj = grad_readout[:, start:stop].reshape(tasks, -1, d_out)
            cross = rows.queries @ keys.transpose(1, 2)                    # B = Q̃ Kᵀ
            mixing_adj = -readout_adj @ residual.transpose(1, 2)           # P̂
            cross_adj = rows.seen * mixing_adj * beta[:, None, :]          # B̂
            beta_adj = beta_adj + (rows.seen * mixing_adj * cross).sum(1)
            residual_adj = residual_adj - (rows.seen * cross * beta[:, None, :]).transpose(1, 2) \
                @ readout_adj
            new_adj = new_adj + rows.queries.transpose(1, 2) @ readout_adj
            query_adj = readout_adj @ state.transpose(1, 2) + cross_adj @ keys
            keys_adj = keys_adj + cross_adj.transpose(1, 2) @ rows.queries
            grad_queries[:, start:stop] = query_adj[..., :d_in].reshape(
                tasks, stop - start, -1, d_in)
        if not first_order:
            system, gram = chunk_system(rows)
            value_adj = torch.linalg.solve_triangular(
                system.transpose(1, 2), residual_adj, upper=True, unitriangular=True)  # V̂
            system_adj = rows.earlier * (-value_adj @ residual.transpose(1, 2))      # Â
            beta_adj = beta_adj + (system_adj * gram).sum(1)
            gram_adj = system_adj * beta[:, None, :]
            keys_adj = keys_adj + value_adj @ state.transpose(1, 2) + \
                (gram_adj + gram_adj.transpose(1, 2)) @ keys
            new_adj = new_adj + keys.transpose(1, 2) @ value_adj
            grad_x[:, start:stop] = keys_adj[..., :d_in].reshape(tasks, stop - start, n, d_in)
            grad_y[:, start:stop] = -value_adj.reshape(tasks, stop - start, n, d_out)
        grad_lr[:, start:stop] = beta_adj.reshape(tasks, stop - start, n).sum(-1) / n
        state_adj = new_adj
    grads = {"weight": state_adj[:, :d_in], "lr": grad_lr,
             "x": None if first_order else grad_x, "y": None if first_order else grad_y,
             "bias": state_adj[:, d_in] if has_bias else None, "queries": grad_queries}
    if weight.dim() == 2:
        grads["weight"] = grads["weight"].sum(0)
    if has_bias and bias.dim() == 1:
        grads["bias"] = grads["bias"].sum(0)
    return grads
