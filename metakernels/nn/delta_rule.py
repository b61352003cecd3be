"""``DeltaRule``: a multi-head delta-rule (DeltaNet) token mixer on :func:`metakernels.delta_rule`,
called as flash-linear-attention's ``DeltaNet`` layer is: ``[B, T, hidden_size]`` in and out, any
length T, an initial state in and the final state out (streaming), packed sequences through
``cu_seqlens``.

Per token, with H heads of key width K and value width V::

    q_t = l2norm(silu(W_q h_t)),  k_t = l2norm(silu(W_k h_t))  (per head)    v_t = W_v h_t
    β_t = sigmoid(W_β h_t) ∈ (0, 1)  (per head; 1 with use_beta=False)
    S_t = S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ k_t)ᵀ        o_t = K^−½ S_tᵀ q_t
    out_t = W_o rmsnorm(o_t)   (the norm per head, with a learned scale)

Unit keys and β ∈ (0, 1) keep every step a contraction. fla's layer adds short convolutions
before the activations by default; this one has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metakernels.nn.fast_weight_memory import _positive_int
from metakernels.ops import delta_rule


class DeltaRule(nn.Module):
    """A delta-rule layer: ``[B, T, hidden_size] -> [B, T, hidden_size]``.

    Args:
        hidden_size: width of the hidden states in and out.
        num_heads: H.
        head_dim: K, each head's key (and query) width; ``hidden_size // num_heads`` when None.
        value_dim: V, each head's value width; ``head_dim`` when None.
        use_beta: learn a per-head, per-token step β_t = sigmoid(W_β h_t); else β_t = 1.
        norm_eps: the epsilon of the output RMS norm.
        backend: passed to :func:`metakernels.delta_rule`.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, *, head_dim: int | None = None,
                 value_dim: int | None = None, use_beta: bool = True, norm_eps: float = 1e-5,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            _positive_int(name, value)
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        value_dim = head_dim if value_dim is None else value_dim
        for name, value in (("head_dim", head_dim), ("value_dim", value_dim)):
            _positive_int(name, value)
        if not isinstance(use_beta, bool):
            raise TypeError(f"use_beta must be a bool, got {type(use_beta).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim, self.value_dim, self.backend = head_dim, value_dim, backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, num_heads * value_dim, bias=False, **factory)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False, **factory) if use_beta else None
        self.o_norm = nn.RMSNorm(value_dim, eps=norm_eps, **factory)
        self.o_proj = nn.Linear(num_heads * value_dim, hidden_size, bias=False, **factory)

    def inputs(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The op's ``(q, k, v, β)`` for ``hidden_states [B, T, hidden_size]``:
        ``[B, T, H, K]``, ``[B, T, H, K]``, ``[B, T, H, V]``, ``[B, T, H]``."""
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got "
                            f"{type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has shape {list(hidden_states.shape)}, expected "
                             f"[B, T, hidden_size] with hidden_size = {self.hidden_size}")
        batch, length = hidden_states.shape[:2]
        heads = (batch, length, self.num_heads)
        q = F.normalize(F.silu(self.q_proj(hidden_states)).reshape(*heads, self.head_dim), dim=-1)
        k = F.normalize(F.silu(self.k_proj(hidden_states)).reshape(*heads, self.head_dim), dim=-1)
        v = self.v_proj(hidden_states).reshape(*heads, self.value_dim)
        if self.b_proj is None:
            beta = hidden_states.new_ones(heads)
        else:
            beta = torch.sigmoid(self.b_proj(hidden_states))
        return q, k, v, beta

    def forward(self, hidden_states: Tensor, *, initial_state: Tensor | None = None,
                output_final_state: bool = False,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``hidden_states [B, T, hidden_size]`` -> ``(out [B, T, hidden_size], final_state
        [N, H, K, V] or None)``; ``initial_state [N, H, K, V]``, ``cu_seqlens`` and
        ``output_final_state`` as in :func:`metakernels.delta_rule` (N = B, or the number of
        packed sequences with B = 1)."""
        q, k, v, beta = self.inputs(hidden_states)
        o, final_state = delta_rule(q, k, v, beta, initial_state=initial_state,
                                    output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, backend=self.backend)
        out = self.o_proj(self.o_norm(o).flatten(-2))
        return out, final_state

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, value_dim={self.value_dim}, "
                f"use_beta={self.b_proj is not None}, backend={self.backend!r}")

