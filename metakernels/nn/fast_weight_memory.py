"""``FastWeightMemory``: a sequence layer whose state is a fast weight trained by gradient
descent while it reads, chunk by chunk (test-time training / the delta rule), on
:func:`metakernels.fast_weight_unroll` with 4-D x and a readout.

For hidden states ``h [B, L, d_model]`` with ``L = T·c`` (c = ``chunk_size``), chunk t
(tokens ``t·c ... t·c + c − 1``) gives the inner loop's data of step t::

    x_t = k(h_t) [B, c, d_key]     y_t = v(h_t) [B, c, d_value]     q_t = q(h_t) [B, c, d_key]
    W_0 = the meta-learned init (shared by every sequence), b_0 likewise when bias=True
    W_{t+1} = W_t − η_t ∇_W ℓ_t,   ℓ_t = 1/(2c) Σ_i ‖x_{t,i} W_t + b_t − y_{t,i}‖²

and the layer's output for chunk t is ``out(q_t W_{t+1} + b_{t+1})`` with ``readout="after"``
(the default) or ``out(q_t W_t + b_t)`` with ``readout="before"``.

Causality, exactly: with ``readout="after"`` the output of every token of chunk t depends on
all c tokens of chunk t (and on every earlier chunk), so inside a chunk a token sees the tokens
after it; this is the delta rule's write-then-read order (with c = 1 it is DeltaNet: token t
reads the state that already holds token t). With ``readout="before"`` chunk t reads the state
left by chunks 0..t−1 only, so no token sees its own chunk: strictly causal for next-token
prediction at any chunk size, and chunk 0 reads the meta-init. Keys and queries are
L2-normalised by default (``normalize_keys``): with unit rows the inner step is stable for any
η < 2.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metakernels.ops import fast_weight_unroll

READOUTS = ("after", "before")


class MemoryState(NamedTuple):
    """What :class:`FastWeightMemory` returns beside its output with ``return_state=True``.

    weight: ``[B, d_key, d_value]`` W_T, the fast weights after the last chunk.
    bias:   ``[B, d_value]`` b_T, or None without a bias.
    losses: ``[B, T]`` the inner loss of chunk t at (W_t, b_t), before its step; detached.
    """

    weight: Tensor
    bias: Optional[Tensor]
    losses: Tensor


class FastWeightMemory(nn.Module):
    """A fast-weight memory layer: ``[B, L, d_model] -> [B, L, d_model]``.

    Args:
        d_model: width of the hidden states in and out.
        d_key: width of the keys and queries (the fast weight's rows).
        d_value: width of the values (the fast weight's columns); defaults to ``d_key``.
        chunk_size: c, tokens per inner step; the sequence length must be a multiple of it.
        bias: learn a meta-init bias ``[d_value]`` that adapts too.
        max_chunks: None learns one inner lr for every step; an int S learns one per step
            ``[S]`` (MAML++ style) and sequences may have at most S chunks.
        inner_lr: the initial inner learning rate (> 0). The lr is ``softplus(raw)``, so it
            stays positive while it is learned.
        normalize_keys: L2-normalise keys and queries.
        readout: ``"after"`` (chunk t reads W_{t+1}) or ``"before"`` (chunk t reads W_t); see
            the module docstring.
        first_order: drop the second-order terms of the meta-gradient (FOMAML). Keys and
            values enter the output only through the inner gradient, so with first_order
            ``to_key`` and ``to_value`` get no gradient: only the init, the lr, the queries and
            the output projection learn.
        backend: passed to :func:`metakernels.fast_weight_unroll`.
    """

    def __init__(self, d_model: int, d_key: int, d_value: int | None = None, *,
                 chunk_size: int, bias: bool = False, max_chunks: int | None = None,
                 inner_lr: float = 1.0, normalize_keys: bool = True, readout: str = "after",
                 first_order: bool = False, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        d_value = d_key if d_value is None else d_value
        for name, value in (("d_model", d_model), ("d_key", d_key), ("d_value", d_value),
                            ("chunk_size", chunk_size)):
            _positive_int(name, value)
        if max_chunks is not None:
            _positive_int("max_chunks", max_chunks)
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
            raise TypeError(f"inner_lr must be a float, got {type(inner_lr).__name__}")
        if not (inner_lr > 0 and math.isfinite(inner_lr)):
            raise ValueError(f"inner_lr must be positive and finite, got {inner_lr}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        for name, value in (("bias", bias), ("normalize_keys", normalize_keys),
                            ("first_order", first_order)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_key, self.d_value = d_model, d_key, d_value
        self.chunk_size, self.max_chunks = chunk_size, max_chunks
        self.normalize_keys, self.readout = normalize_keys, readout
        self.first_order, self.backend = first_order, backend

        self.to_key = nn.Linear(d_model, d_key, bias=False, **factory)
        self.to_value = nn.Linear(d_model, d_value, bias=False, **factory)
        self.to_query = nn.Linear(d_model, d_key, bias=False, **factory)
        self.to_out = nn.Linear(d_value, d_model, bias=False, **factory)
        self.init_weight = nn.Parameter(torch.empty(d_key, d_value, **factory))
        self.init_bias = nn.Parameter(torch.zeros(d_value, **factory)) if bias else None
        # softplus⁻¹(inner_lr), so that softplus(raw) starts at inner_lr.
        raw = inner_lr + math.log(-math.expm1(-inner_lr))
        self.inner_lr_raw = nn.Parameter(torch.full((max_chunks,) if max_chunks else (), raw,
                                                    **factory))
        nn.init.normal_(self.init_weight, std=d_key ** -0.5)

    def inner_lr(self, chunks: int | None = None) -> Tensor:
        """The positive inner learning rate: ``[]``, or ``[T]`` for the first T chunks."""
        lr = F.softplus(self.inner_lr_raw)
        return lr if self.max_chunks is None or chunks is None else lr[:chunks]

    def _project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Checks ``hidden`` and returns its keys, values and queries, ``[B, T, c, ·]``."""
        if not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden has shape {list(hidden.shape)}, expected "
                             f"[B, L, d_model] with d_model = {self.d_model}")
        batch, length, c = hidden.shape[0], hidden.shape[1], self.chunk_size
        if length == 0 or length % c:
            raise ValueError(f"hidden has sequence length L = {length}, which must be a positive "
                             f"multiple of chunk_size = {c} (one inner step per chunk); pad the "
                             "sequence to a whole number of chunks")
        chunks = length // c
        if self.max_chunks is not None and chunks > self.max_chunks:
            raise ValueError(f"hidden has {chunks} chunks of {c} tokens (L = {length}), more than "
                             f"max_chunks = {self.max_chunks}, the number of learned inner lrs")
        if hidden.dtype != self.init_weight.dtype:
            raise ValueError(f"hidden has dtype {hidden.dtype} but the layer's parameters have "
                             f"{self.init_weight.dtype}")

        keys, values, queries = self.to_key(hidden), self.to_value(hidden), self.to_query(hidden)
        if self.normalize_keys:
            keys, queries = F.normalize(keys, dim=-1), F.normalize(queries, dim=-1)
        keys = keys.reshape(batch, chunks, c, self.d_key)
        values = values.reshape(batch, chunks, c, self.d_value)
        queries = queries.reshape(batch, chunks, c, self.d_key)
        return keys, values, queries

    def read_every_chunk(self, hidden: Tensor, query: Tensor) -> Tensor:
        """``[B, T, m, d_value]``: the hidden states ``query [B, m, d_model]`` read out of the
        fast weights after every chunk of ``hidden [B, T·c, d_model]``, ``q W_{t+1} + b_{t+1}``
        for t = 0 … T − 1 (q: ``query``'s query projection, normalised as every query), all from
        one call of the fused op (its readout). The inner loop is :meth:`forward`'s."""
        keys, values, _ = self._project(hidden)
        if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[0] != keys.shape[0] \
                or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be a [B, m, d_model] tensor with B = {keys.shape[0]} "
                             f"and d_model = {self.d_model}, got "
                             f"{list(query.shape) if isinstance(query, Tensor) else query!r}")
        read = self.to_query(query)
        if self.normalize_keys:
            read = F.normalize(read, dim=-1)
        read = read[:, None].expand(-1, keys.shape[1], -1, -1)
        return fast_weight_unroll(self.init_weight, keys, values, self.inner_lr(keys.shape[1]),
                                  bias=self.init_bias, queries=read, first_order=self.first_order,
                                  backend=self.backend).readout

    def forward(self, hidden: Tensor, *, return_state: bool = False):
        """``hidden [B, L, d_model]`` -> ``[B, L, d_model]``, and a :class:`MemoryState` with
        ``return_state=True``."""
        keys, values, queries = self._project(hidden)
        batch, chunks, c = keys.shape[:3]
        length = chunks * c
        if self.readout == "before":
            # Step t's readout is Q W_{t+1}: chunk t+1 reads it there; chunk 0 reads W_0 below,
            # and the last step's readout rows (zeros) are dropped.
            step_queries = torch.cat([queries[:, 1:], torch.zeros_like(queries[:, :1])], 1)
        else:
            step_queries = queries
        unrolled = fast_weight_unroll(
            self.init_weight, keys, values, self.inner_lr(chunks), bias=self.init_bias,
            queries=step_queries, first_order=self.first_order, backend=self.backend)
        read = unrolled.readout
        if self.readout == "before":
            first = queries[:, :1] @ self.init_weight
            if self.init_bias is not None:
                first = first + self.init_bias
            read = torch.cat([first, read[:, :-1]], 1)
        output = self.to_out(read.reshape(batch, length, self.d_value))
        if not return_state:
            return output
        return output, MemoryState(unrolled.weight, unrolled.bias, unrolled.losses)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_key={self.d_key}, d_value={self.d_value}, "
                f"chunk_size={self.chunk_size}, bias={self.init_bias is not None}, "
                f"max_chunks={self.max_chunks}, readout={self.readout!r}, "
                f"first_order={self.first_order}, backend={self.backend!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
