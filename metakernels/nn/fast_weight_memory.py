"""``FastWeightMemory``: a sequence layer whose state is a fast weight trained by gradient
descent while it reads, chunk by chunk (test-time training / the delta rule), on
:func:`metakernels.fast_weight_unroll` with 4-D x and a readout.

For hidden states ``h [B, L, d_model]`` of any length L ≥ 1, cut into T = ⌈L/c⌉ chunks of
c = ``chunk_size`` tokens (the last one shorter, c_t = L − (T − 1)·c tokens, where c does not
divide L), chunk t (tokens ``t·c ... t·c + c_t − 1``) gives the inner loop's data of step t::

    x_t = k(h_t) [B, c_t, d_key]   y_t = v(h_t) [B, c_t, d_value]   q_t = q(h_t) [B, c_t, d_key]
    W_0 = the meta-learned init (shared by every sequence), b_0 likewise when bias=True
    W_{t+1} = W_t − η_t ∇_W ℓ_t,   ℓ_t = 1/(2c_t) Σ_i ‖x_{t,i} W_t + b_t − y_{t,i}‖²

and the layer's output for chunk t is ``out(q_t W_{t+1} + b_{t+1})`` with ``readout="after"``
(the default) or ``out(q_t W_t + b_t)`` with ``readout="before"``.

Causality, exactly: with ``readout="after"`` the output of every token of chunk t depends on
all c tokens of chunk t (and on every earlier chunk), so inside a chunk a token sees the tokens
after it; this is the delta rule's write-then-read order (with c = 1 it is DeltaNet: token t
reads the state that already holds token t). With ``readout="before"`` chunk t reads the state
left by chunks 0..t−1 only, so no token sees its own chunk: strictly causal for next-token
prediction at any chunk size, and chunk 0 reads the meta-init. Keys and queries are
L2-normalised by default (``normalize_keys``): with unit rows the inner step is stable for any
η < 2. A shorter last chunk runs as a second call of the op from the state the whole chunks
leave (one call where c divides L).
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
        chunk_size: c, tokens per inner step; a sequence of any length runs, its last chunk
            shorter where c does not divide the length.
        bias: learn a meta-init bias ``[d_value]`` that adapts too.
        max_chunks: None learns one inner lr for every step; an int S learns one per step
            ``[S]`` (MAML++ style) and sequences may have at most S chunks (⌈L/c⌉ ≤ S).
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
        """Checks ``hidden`` and returns its keys, values and queries, ``[B, L, ·]``."""
        if not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden has shape {list(hidden.shape)}, expected "
                             f"[B, L, d_model] with d_model = {self.d_model}")
        length, c = hidden.shape[1], self.chunk_size
        if length == 0:
            raise ValueError("hidden has sequence length L = 0, expected at least one token")
        chunks = -(-length // c)
        if self.max_chunks is not None and chunks > self.max_chunks:
            raise ValueError(f"hidden has {chunks} chunks of up to {c} tokens (L = {length}), "
                             f"more than max_chunks = {self.max_chunks}, the number of learned "
                             "inner lrs")
        if hidden.dtype != self.init_weight.dtype:
            raise ValueError(f"hidden has dtype {hidden.dtype} but the layer's parameters have "
                             f"{self.init_weight.dtype}")

        keys, values, queries = self.to_key(hidden), self.to_value(hidden), self.to_query(hidden)
        if self.normalize_keys:
            keys, queries = F.normalize(keys, dim=-1), F.normalize(queries, dim=-1)
        return keys, values, queries

    def _unroll(self, keys: Tensor, values: Tensor, step_queries) -> list:
        """The inner loop over the chunks of ``keys, values [B, L, ·]``, as one call of the op
        per run of equal chunks: the whole chunks, then a shorter last one from the state they
        leave. ``step_queries(start, stop, rows)`` gives the readout queries
        ``[B, stop − start, m, d_key]`` of the steps [start, stop) of ``rows`` tokens each (or
        None). Returns ``(start, rows, UnrollOutput)`` of each call, in order."""
        batch, length = keys.shape[:2]
        c = self.chunk_size
        whole, rest = divmod(length, c)
        lr = self.inner_lr(whole + (rest > 0))
        runs = ([(0, whole, c)] if whole else []) + ([(whole, whole + 1, rest)] if rest else [])
        weight, bias, outputs = self.init_weight, self.init_bias, []
        for start, stop, rows in runs:
            tokens = slice(start * c, start * c + (stop - start) * rows)
            out = fast_weight_unroll(
                weight, keys[:, tokens].reshape(batch, stop - start, rows, self.d_key),
                values[:, tokens].reshape(batch, stop - start, rows, self.d_value),
                lr if lr.dim() == 0 else lr[start:stop], bias=bias,
                queries=step_queries(start, stop, rows), first_order=self.first_order,
                backend=self.backend)
            weight, bias = out.weight, out.bias
            outputs.append((start, rows, out))
        return outputs

    def read_every_chunk(self, hidden: Tensor, query: Tensor) -> Tensor:
        """``[B, T, m, d_value]``: the hidden states ``query [B, m, d_model]`` read out of the
        fast weights after every chunk of ``hidden [B, L, d_model]`` (T = ⌈L/c⌉ chunks),
        ``q W_{t+1} + b_{t+1}`` for t = 0 … T − 1 (q: ``query``'s query projection, normalised as
        every query), from the fused op's readout. The inner loop is :meth:`forward`'s."""
        keys, values, _ = self._project(hidden)
        if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[0] != keys.shape[0] \
                or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be a [B, m, d_model] tensor with B = {keys.shape[0]} "
                             f"and d_model = {self.d_model}, got "
                             f"{list(query.shape) if isinstance(query, Tensor) else query!r}")
        read = self.to_query(query)
        if self.normalize_keys:
            read = F.normalize(read, dim=-1)
        runs = self._unroll(
            keys, values, lambda start, stop, rows: read[:, None].expand(-1, stop - start, -1, -1))
        return torch.cat([out.readout for _, _, out in runs], 1)

    def forward(self, hidden: Tensor, *, return_state: bool = False):
        """``hidden [B, L, d_model]`` -> ``[B, L, d_model]``, and a :class:`MemoryState` with
        ``return_state=True``."""
        keys, values, queries = self._project(hidden)
        batch, length = keys.shape[:2]
        c = self.chunk_size

        def chunked(start, stop, rows):  # the queries of chunks [start, stop) of `rows` tokens
            tokens = slice(start * c, start * c + (stop - start) * rows)
            return queries[:, tokens].reshape(batch, stop - start, rows, self.d_key)

        if self.readout == "after":
            runs = self._unroll(keys, values, chunked)
            read = [out.readout.reshape(batch, -1, self.d_value) for _, _, out in runs]
        else:
            # Chunk t reads W_t: step t's readout is chunk t+1's queries at W_{t+1} among the whole
            # chunks (the last step's rows, zeros, are dropped); chunk 0 reads the init and a
            # shorter last chunk reads the state the whole chunks leave, in PyTorch.
            def shifted(start, stop, rows):
                if rows != c:
                    return None
                ahead = chunked(start, stop, rows)
                return torch.cat([ahead[:, 1:], torch.zeros_like(ahead[:, :1])], 1)

            runs = self._unroll(keys, values, shifted)
            weight, bias, read = self.init_weight, self.init_bias, []
            for start, rows, out in runs:
                first = chunked(start, start + 1, rows)[:, 0] @ weight  # chunk `start`: W_start
                read.append(first if bias is None else first + bias.unsqueeze(-2))
                if out.readout is not None:
                    read.append(out.readout[:, :-1].reshape(batch, -1, self.d_value))
                weight, bias = out.weight, out.bias
        output = self.to_out(torch.cat(read, 1))
        if not return_state:
            return output
        last = runs[-1][2]
        return output, MemoryState(last.weight, last.bias,
                                   torch.cat([out.losses for _, _, out in runs], 1))

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
