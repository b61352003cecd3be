"""Reference implementation of ``delta_rule`` (docs/ops/delta_rule.md): the recurrence written out
token by token, in plain PyTorch, with the public function's signature (less ``backend``).

Per sequence and head, with the state ``S`` ``[K, V]`` starting at ``initial_state`` (zeros when
None)::

    S_t = S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ k_t)ᵀ        o_t = scale · S_tᵀ q_t

so ``o_t`` is read after the update with token t. This is :func:`fast_weight_unroll` with one
support row per step (n = 1), mse, ``W = S``, ``lr = β``, ``x = k``, ``y = v`` and the readout
``queries = scale · q``. Gradients come from autograd through the loop (double backward works).
The state and every accumulation are float32 (float64 for float64 inputs); ``o`` takes q's dtype,
the final state float64 for float64 inputs and float32 otherwise.

Memory: autograd stores every step's state, O(N·H·T·K·V).
"""

from __future__ import annotations

import torch
from torch import Tensor


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: Tensor | None = None,
               cu_seqlens_cpu: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]``; ``initial_state
    [N, H, K, V]`` (N = B, or the number of packed sequences with ``cu_seqlens [N + 1]`` and
    B = 1; ``cu_seqlens_cpu`` its host copy, read instead where given). Returns ``(o [B, T, H, V], final_state [N, H, K, V] or None)``. Arguments are taken as
    valid (:func:`metakernels.delta_rule` checks them)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    scale = d_k ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        sequences = [(b, 0, length) for b in range(batch)]
    else:
        bounds = (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).tolist()
        sequences = [(0, start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    outputs, finals = [], []
    for index, (b, start, stop) in enumerate(sequences):
        state = (q.new_zeros(heads, d_k, d_v, dtype=dtype) if initial_state is None
                 else initial_state[index].to(dtype))
        for t in range(start, stop):
            q_t, k_t, v_t = q[b, t].to(dtype), k[b, t].to(dtype), v[b, t].to(dtype)  # [H, ·]
            beta_t = beta[b, t].to(dtype)[:, None]                                   # [H, 1]
            error = v_t - torch.einsum("hkv,hk->hv", state, k_t)   # v_t − Sᵀ k_t
            state = state + torch.einsum("hk,hv->hkv", k_t, beta_t * error)
            outputs.append(scale * torch.einsum("hkv,hk->hv", state, q_t))
        finals.append(state)
    if outputs:
        o = torch.stack(outputs).reshape(batch, length, heads, d_v).to(q.dtype)
    else:
        o = q.new_zeros(batch, length, heads, d_v)
    return o, (torch.stack(finals) if output_final_state else None)
