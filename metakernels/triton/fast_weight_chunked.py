"""Triton kernels of the chunked (WY/UT) form of ``fast_weight_unroll`` (mse, 4-D x, no
``lr_scale``, ``bias_lr_scale`` absent or all ones): the maths is README.md, "The chunked form",
and its plain-PyTorch spec ``metakernels/reference/fast_weight_chunked.py``.

Grid ``(B, NV)``: program ``(b, v)`` owns task b and the d_out columns ``[v·BV, (v+1)·BV)``, as in
:mod:`metakernels.triton.fast_weight_unroll`; the columns of mse never meet, so each program runs
every chunk of its tile alone. A chunk is ``BC`` stacked rows (``C = BC // n`` steps, knob
:data:`CHUNK_ROWS`); its products (``X Xᵀ``, ``X W``, ``Xᵀ (β R)``, the readout's ``Q Xᵀ``, and the
backward's) are ``tl.dot`` on float32 tiles, the state is float32 in registers. The unit lower
triangular ``L = I + M ∘ (X Xᵀ + 1) diag β`` is inverted by forward substitution, row by row
(stable where the steps are: no powers of L), and ``R = L⁻¹ (X W + 1 bᵀ − Y)``; the backward
applies ``L⁻ᵀ`` with the same inverse. The bias is kept apart from W rather than as a row of it,
so that d_in = 128 stays one 128-wide tile.

Quantities that sum over d_out (the losses, η̂, X̂, Q̂) are written per column tile, float32
``[NV, ...]``, and summed afterwards. The forward saves ``E_t`` of every step (like the step
kernels); the backward first rebuilds the chunk starts from ``W_0`` and ``E`` into a float32
scratch ``[B, NC, d_in, d_out]`` (the state at chunk starts only), then runs the chunks from the
last. Limits: a task's tiles ``[d_in, BV]``, ``[BC, d_in]``, ``[BC·m/n, d_in]`` padded to powers of
two must fit ``MAX_TILE`` float32 elements (RuntimeError otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metakernels.triton import _launch

# The stacked rows of a chunk (a power of two, at least 16): C = CHUNK_ROWS // n steps.
CHUNK_ROWS = 64


@triton.jit
def _chunk_tiles(i_c, T, n, m, d_in, CS, BC: tl.constexpr, BCM: tl.constexpr, BK: tl.constexpr):
    """The rows of chunk i_c: global row offsets, the valid rows and query rows, the step of each
    row and query row (for the masks M and N), and the columns of d_in."""
    t0 = i_c * CS
    steps = tl.minimum(CS, T - t0)
    o_r = tl.arange(0, BC)
    o_q = tl.arange(0, BCM)
    o_k = tl.arange(0, BK)
    m_r = o_r < steps * n
    m_q = o_q < steps * m
    s_r = o_r // n
    s_q = o_q // tl.maximum(m, 1)
    return t0, o_r, o_q, o_k, m_r, m_q, s_r, s_q, o_k < d_in


@triton.jit
def _chunk_system(b_x, b_beta, s_r, m_r, HAS_BIAS: tl.constexpr, BC: tl.constexpr,
                  PRECISION: tl.constexpr):
    """(G = X̃ X̃ᵀ, L⁻¹) of a chunk, L = I + M ∘ G diag β, by forward substitution row by row."""
    b_g = tl.dot(b_x, tl.trans(b_x), input_precision=PRECISION)
    if HAS_BIAS:
        b_g += 1.0
    m_earlier = (s_r[:, None] > s_r[None, :]) & m_r[:, None] & m_r[None, :]
    b_a = tl.where(m_earlier, b_g * b_beta[None, :], 0.0)
    o_r = tl.arange(0, BC)
    b_inv = (o_r[:, None] == o_r[None, :]).to(tl.float32)
    for i in range(1, BC):
        b_ai = tl.sum(tl.where(o_r[:, None] == i, b_a, 0.0), 0)           # row i of A
        b_row = tl.sum(b_ai[:, None] * b_inv, 0)                            # Σ_j A_ij L⁻¹_j
        b_inv = tl.where(o_r[:, None] == i, b_inv - b_row[None, :], b_inv)
    return b_g, b_inv, m_earlier


@triton.jit
def _initial_state(p_weight, p_bias, i_b, i_v, s_w_b, s_b_b, d_in, d_out,
                   HAS_BIAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Column tile i_v of task i_b: its columns and masks, W's [d_in, BV] offsets, and W_0, b_0
    in float32 (b_0 zero without a bias)."""
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < d_out
    o_k = tl.arange(0, BK)
    m_kv = (o_k < d_in)[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * d_out + o_v[None, :]
    b_w = tl.load(p_weight + i_b * s_w_b + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    b_b = tl.zeros([BV], dtype=tl.float32)
    if HAS_BIAS:
        b_b = tl.load(p_bias + i_b * s_b_b + o_v, mask=m_v, other=0.0).to(tl.float32)
    return o_v, m_v, m_kv, o_kv, b_w, b_b


@triton.jit
def fast_weight_chunked_fwd_kernel(
    p_weight, p_bias, p_x, p_y, p_lr, p_queries,
    p_weight_out, p_bias_out, p_losses, p_readout, p_residual,
    s_w_b, s_b_b, s_x_b, s_y_b,
    B, T, n, m, d_in, d_out, CS,
    HAS_BIAS: tl.constexpr, HAS_QUERIES: tl.constexpr,
    BC: tl.constexpr, BCM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_v, m_v, m_kv, o_kv, b_w, b_b = _initial_state(p_weight, p_bias, i_b, i_v, s_w_b, s_b_b,
                                                    d_in, d_out, HAS_BIAS, BK, BV)

    for i_c in range(0, tl.cdiv(T, CS)):
        t0, o_r, o_q, o_k, m_r, m_q, s_r, s_q, m_k = _chunk_tiles(i_c, T, n, m, d_in, CS, BC,
                                                                  BCM, BK)
        row0 = t0 * n
        b_x = tl.load(p_x + i_b * s_x_b + (row0 + o_r[:, None]) * d_in + o_k[None, :],
                      mask=m_r[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        m_rv = m_r[:, None] & m_v[None, :]
        b_y = tl.load(p_y + i_b * s_y_b + (row0 + o_r[:, None]) * d_out + o_v[None, :],
                      mask=m_rv, other=0.0).to(tl.float32)
        b_beta = tl.load(p_lr + i_b * T + t0 + s_r, mask=m_r, other=0.0).to(tl.float32) / n
        b_g, b_inv, m_earlier = _chunk_system(b_x, b_beta, s_r, m_r, HAS_BIAS, BC, PRECISION)
        b_val = tl.dot(b_x, b_w, input_precision=PRECISION) + b_b[None, :] - b_y
        b_r = tl.where(m_rv, tl.dot(b_inv, b_val, input_precision=PRECISION), 0.0)
        o_rv = (i_b * T * n + row0 + o_r[:, None]) * d_out + o_v[None, :]
        tl.store(p_residual + o_rv, b_r / n, mask=m_rv)
        # Per-row partial losses ½‖r‖² / n over this column tile; summed per step outside.
        tl.store(p_losses + (i_v * B + i_b) * T * n + row0 + o_r, tl.sum(b_r * b_r, 1) / (2 * n),
                 mask=m_r)
        b_rb = b_r * b_beta[:, None]
        if HAS_QUERIES:
            qrow0 = t0 * m
            m_qk = m_q[:, None] & m_k[None, :]
            b_q = tl.load(p_queries + (i_b * T * m + qrow0 + o_q[:, None]) * d_in + o_k[None, :],
                          mask=m_qk, other=0.0).to(tl.float32)
            b_cross = tl.dot(b_q, tl.trans(b_x), input_precision=PRECISION)
            if HAS_BIAS:
                b_cross += 1.0
            m_seen = (s_r[None, :] <= s_q[:, None]) & m_q[:, None] & m_r[None, :]
            b_cross = tl.where(m_seen, b_cross, 0.0)
            b_o = tl.dot(b_q, b_w, input_precision=PRECISION) + b_b[None, :]
            b_o -= tl.dot(b_cross, b_rb, input_precision=PRECISION)
            m_qv = m_q[:, None] & m_v[None, :]
            tl.store(p_readout + (i_b * T * m + qrow0 + o_q[:, None]) * d_out + o_v[None, :],
                     b_o.to(p_readout.dtype.element_ty), mask=m_qv)
        b_w -= tl.dot(tl.trans(b_x), b_rb, input_precision=PRECISION)
        if HAS_BIAS:
            b_b -= tl.sum(b_rb, 0)

    tl.store(p_weight_out + i_b * d_in * d_out + o_kv, b_w.to(p_weight_out.dtype.element_ty),
             mask=m_kv)
    if HAS_BIAS:
        tl.store(p_bias_out + i_b * d_out + o_v, b_b.to(p_bias_out.dtype.element_ty), mask=m_v)


@triton.jit
def fast_weight_chunked_bwd_kernel(
    p_weight, p_bias, p_x, p_lr, p_queries, p_residual,
    p_grad_weight_final, p_grad_bias_final, p_grad_readout,
    p_starts_w, p_starts_b,
    p_grad_weight, p_grad_bias, p_grad_x_part, p_grad_y, p_grad_lr_part, p_grad_queries_part,
    s_w_b, s_b_b, s_x_b,
    B, T, n, m, d_in, d_out, CS, NC,
    HAS_BIAS: tl.constexpr, HAS_QUERIES: tl.constexpr, FIRST_ORDER: tl.constexpr,
    WANT_X: tl.constexpr, WANT_Y: tl.constexpr, WANT_QUERIES: tl.constexpr,
    BC: tl.constexpr, BCM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_v, m_v, m_kv, o_kv, b_w, b_b = _initial_state(p_weight, p_bias, i_b, i_v, s_w_b, s_b_b,
                                                    d_in, d_out, HAS_BIAS, BK, BV)

    # The chunk starts: S′ = S − X̃ᵀ diag(β) R, with R = n E as saved.
    for i_c in range(0, NC):
        tl.store(p_starts_w + (i_b * NC + i_c) * d_in * d_out + o_kv, b_w, mask=m_kv)
        if HAS_BIAS:
            tl.store(p_starts_b + (i_b * NC + i_c) * d_out + o_v, b_b, mask=m_v)
        t0, o_r, o_q, o_k, m_r, m_q, s_r, s_q, m_k = _chunk_tiles(i_c, T, n, m, d_in, CS, BC,
                                                                  BCM, BK)
        row0 = t0 * n
        m_rv = m_r[:, None] & m_v[None, :]
        b_x = tl.load(p_x + i_b * s_x_b + (row0 + o_r[:, None]) * d_in + o_k[None, :],
                      mask=m_r[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_beta = tl.load(p_lr + i_b * T + t0 + s_r, mask=m_r, other=0.0).to(tl.float32) / n
        b_r = tl.load(p_residual + (i_b * T * n + row0 + o_r[:, None]) * d_out + o_v[None, :],
                      mask=m_rv, other=0.0) * n
        b_rb = b_r * b_beta[:, None]
        b_w -= tl.dot(tl.trans(b_x), b_rb, input_precision=PRECISION)
        if HAS_BIAS:
            b_b -= tl.sum(b_rb, 0)

    # Ŝ′ of the last chunk: Ŵ_T, b̂_T.
    b_wh = tl.load(p_grad_weight_final + i_b * d_in * d_out + o_kv, mask=m_kv, other=0.0
                   ).to(tl.float32)
    b_bh = tl.zeros([BV], dtype=tl.float32)
    if HAS_BIAS:
        b_bh = tl.load(p_grad_bias_final + i_b * d_out + o_v, mask=m_v, other=0.0).to(tl.float32)

    for j_c in range(0, NC):
        i_c = NC - 1 - j_c
        t0, o_r, o_q, o_k, m_r, m_q, s_r, s_q, m_k = _chunk_tiles(i_c, T, n, m, d_in, CS, BC,
                                                                  BCM, BK)
        row0 = t0 * n
        m_rv = m_r[:, None] & m_v[None, :]
        m_rk = m_r[:, None] & m_k[None, :]
        b_w = tl.load(p_starts_w + (i_b * NC + i_c) * d_in * d_out + o_kv, mask=m_kv, other=0.0)
        b_x = tl.load(p_x + i_b * s_x_b + (row0 + o_r[:, None]) * d_in + o_k[None, :],
                      mask=m_rk, other=0.0).to(tl.float32)
        b_beta = tl.load(p_lr + i_b * T + t0 + s_r, mask=m_r, other=0.0).to(tl.float32) / n
        b_r = tl.load(p_residual + (i_b * T * n + row0 + o_r[:, None]) * d_out + o_v[None, :],
                      mask=m_rv, other=0.0) * n

        # Through S′ = S − X̃ᵀ diag(β) R.
        b_pushed = tl.dot(b_x, b_wh, input_precision=PRECISION) + b_bh[None, :]
        b_beta_h = -tl.sum(b_pushed * b_r, 1)
        b_rh = -b_beta[:, None] * b_pushed
        b_xh = tl.zeros([BC, BK], dtype=tl.float32)
        if WANT_X:
            b_xh = -b_beta[:, None] * tl.dot(b_r, tl.trans(b_wh), input_precision=PRECISION)
        b_wh_new = b_wh
        b_bh_new = b_bh

        # Through O = Q̃ S − P R, P = (N ∘ Q̃ X̃ᵀ) diag β.
        if HAS_QUERIES:
            qrow0 = t0 * m
            m_qk = m_q[:, None] & m_k[None, :]
            m_qv = m_q[:, None] & m_v[None, :]
            b_q = tl.load(p_queries + (i_b * T * m + qrow0 + o_q[:, None]) * d_in + o_k[None, :],
                          mask=m_qk, other=0.0).to(tl.float32)
            b_oh = tl.load(p_grad_readout + (i_b * T * m + qrow0 + o_q[:, None]) * d_out
                           + o_v[None, :], mask=m_qv, other=0.0).to(tl.float32)
            b_cross = tl.dot(b_q, tl.trans(b_x), input_precision=PRECISION)
            if HAS_BIAS:
                b_cross += 1.0
            m_seen = (s_r[None, :] <= s_q[:, None]) & m_q[:, None] & m_r[None, :]
            b_cross = tl.where(m_seen, b_cross, 0.0)
            b_ph = tl.where(m_seen, -tl.dot(b_oh, tl.trans(b_r), input_precision=PRECISION), 0.0)
            b_beta_h += tl.sum(b_ph * b_cross, 0)
            b_crossh = b_ph * b_beta[None, :]                                  # B̂
            b_p = b_cross * b_beta[None, :]                                    # P
            b_rh -= tl.dot(tl.trans(b_p), b_oh, input_precision=PRECISION)
            b_wh_new += tl.dot(tl.trans(b_q), b_oh, input_precision=PRECISION)
            if HAS_BIAS:
                b_bh_new += tl.sum(b_oh, 0)
            if WANT_QUERIES:
                b_qh = tl.dot(b_oh, tl.trans(b_w), input_precision=PRECISION)
                b_qh += tl.dot(b_crossh, b_x, input_precision=PRECISION)
                tl.store(p_grad_queries_part + ((i_v * B + i_b) * T * m + qrow0 + o_q[:, None])
                         * d_in + o_k[None, :], b_qh, mask=m_qk)
            if WANT_X:
                b_xh += tl.dot(tl.trans(b_crossh), b_q, input_precision=PRECISION)

        # Through L R = X̃ S − Y (second order): V̂ = L⁻ᵀ R̂, Â = M ∘ (−V̂ Rᵀ), Ĝ = Â diag β.
        if not FIRST_ORDER:
            b_g, b_inv, m_earlier = _chunk_system(b_x, b_beta, s_r, m_r, HAS_BIAS, BC, PRECISION)
            b_vh = tl.dot(tl.trans(b_inv), b_rh, input_precision=PRECISION)
            b_ah = tl.where(m_earlier, -tl.dot(b_vh, tl.trans(b_r), input_precision=PRECISION),
                            0.0)
            b_beta_h += tl.sum(b_ah * b_g, 0)
            b_gh = b_ah * b_beta[None, :]
            b_wh_new += tl.dot(tl.trans(b_x), b_vh, input_precision=PRECISION)
            if HAS_BIAS:
                b_bh_new += tl.sum(b_vh, 0)
            if WANT_X:
                b_xh += tl.dot(b_vh, tl.trans(b_w), input_precision=PRECISION)
                b_xh += tl.dot(b_gh + tl.trans(b_gh), b_x, input_precision=PRECISION)
            if WANT_Y:
                tl.store(p_grad_y + (i_b * T * n + row0 + o_r[:, None]) * d_out + o_v[None, :],
                         -b_vh, mask=m_rv)
        if WANT_X:
            tl.store(p_grad_x_part + ((i_v * B + i_b) * T * n + row0 + o_r[:, None]) * d_in
                     + o_k[None, :], b_xh, mask=m_rk)
        tl.store(p_grad_lr_part + (i_v * B + i_b) * T * n + row0 + o_r, b_beta_h / n, mask=m_r)
        b_wh = b_wh_new
        b_bh = b_bh_new

    tl.store(p_grad_weight + i_b * d_in * d_out + o_kv, b_wh, mask=m_kv)
    if HAS_BIAS:
        tl.store(p_grad_bias + i_b * d_out + o_v, b_bh, mask=m_v)


def chunked_applies(x, loss, lr_scale, bias_lr_scale) -> bool:
    """Whether a call can take the chunked kernels: mse, 4-D x, no lr_scale, bias_lr_scale
    absent or all ones (read here on CPU tensors, in the interpreter; on a GPU reading it would
    synchronise with the host, so a given bias_lr_scale runs the step kernels: the same answer)."""
    if loss != 0 or x.dim() != 4 or lr_scale is not None:
        return False
    if bias_lr_scale is None:
        return True
    # meta tensors (compile-only checks) have no values: not known to be ones.
    return bias_lr_scale.device.type == "cpu" and bool((bias_lr_scale == 1).all())


class _Chunked:
    """The inputs of one call made contiguous, with the sizes and block sizes of the kernels."""

    def __init__(self, weight, x, targets, lr, bias, queries, chunk_rows=None):
        self.weight = weight.contiguous()
        self.x = x.contiguous()
        self.targets = targets.contiguous()
        self.lr = lr.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.queries = None if queries is None else queries.contiguous()
        self.tasks, self.steps = self.lr.shape
        self.support, self.d_in = self.x.shape[-2], self.x.shape[-1]
        self.d_out = self.weight.shape[-1]
        self.rows = self.queries.shape[2] if self.queries is not None else 0
        self.has_queries = self.rows > 0
        self.BC = _launch.block(max(self.support, chunk_rows or CHUNK_ROWS))
        self.CS = self.BC // self.support
        self.NC = triton.cdiv(self.steps, self.CS)
        self.BCM = _launch.block(self.CS * self.rows)
        self.BK = _launch.block(self.d_in)
        self.BV = _launch.column_block(self.d_in, self.d_out, whole_rows=False)
        self.NV = triton.cdiv(self.d_out, self.BV)
        _launch.check_fits(weight=(self.BK, self.BV), x=(self.BC, self.BK),
                           residual=(self.BC, self.BV), chunk=(self.BC, self.BC),
                           queries=(self.BCM if self.has_queries else 1, self.BK))
        self.num_warps = _launch.num_warps(self.BK * self.BV, self.BC * self.BK)
        self.precision = _launch.dot_precision(self.weight.dtype)

    def common(self):
        return dict(HAS_BIAS=self.bias is not None, HAS_QUERIES=self.has_queries, BC=self.BC,
                    BCM=self.BCM, BK=self.BK, BV=self.BV, PRECISION=self.precision,
                    num_warps=self.num_warps)

    def or_dummy(self, t):
        return self.weight if t is None else t


def chunked_forward(weight, x, targets, lr, bias, queries, chunk_rows=None):
    """(W_T, b_T or [0], losses [B, T], readout or [0], residual E_t float32, [0]): the outputs
    of ``unroll_forward`` by the chunked kernels (no W_t is ever stored)."""
    u = _Chunked(weight, x, targets, lr, bias, queries, chunk_rows)
    B, T, n, d_in, d_out = u.tasks, u.steps, u.support, u.d_in, u.d_out
    dtype, device = u.weight.dtype, u.weight.device
    out = lambda *shape, dt=dtype: _launch.new_output(shape, dt, device)  # noqa: E731
    weight_out = out(B, d_in, d_out)
    bias_out = out(B, d_out) if bias is not None else _launch.no_output(u.weight)
    readout = out(B, T, u.rows, d_out) if queries is not None else _launch.no_output(u.weight)
    residual = out(B, T, n, d_out, dt=torch.float32)
    row_losses = out(u.NV, B, T, n, dt=torch.float32)
    if B > 0:
        _launch.launch(
            fast_weight_chunked_fwd_kernel, (B, u.NV),
            u.weight, u.or_dummy(u.bias), u.x, u.targets, u.lr, u.or_dummy(u.queries),
            weight_out, u.or_dummy(bias_out if bias is not None else None), row_losses,
            readout if u.has_queries else u.weight, residual,
            _launch.task_stride(u.weight, 3),
            _launch.task_stride(u.bias, 2) if u.bias is not None else 0,
            u.x.stride(0), u.targets.stride(0), B, T, n, u.rows, d_in, d_out, u.CS,
            **u.common())
    losses = row_losses.sum((0, 3)).to(dtype)
    return [weight_out, bias_out, losses, readout, residual,
            torch.empty(0, dtype=torch.float32, device=device)]


def chunked_backward(weight, x, targets, lr, bias, queries, residual, grad_weight_final,
                     grad_bias_final, grad_readout, first_order, wanted, chunk_rows=None):
    """The gradients of ``unroll_backward`` (lr_scale and bias_lr_scale get none: the caller
    runs the step kernels when bias_lr_scale's is wanted) by the chunked kernels."""
    u = _Chunked(weight, x, targets, lr, bias, queries, chunk_rows)
    B, T, n, m, d_in, d_out, NV = u.tasks, u.steps, u.support, u.rows, u.d_in, u.d_out, u.NV
    dtype, device = u.weight.dtype, u.weight.device
    want = [bool(w) for w in wanted]
    f32 = torch.float32
    buf = lambda need, *shape: _launch.new_output(shape, f32, device) if need else None  # noqa
    grad_weight = _launch.new_output((B, d_in, d_out), f32, device)
    grad_bias = buf(u.bias is not None, B, d_out)
    grad_x_part = buf(want[1], NV, *u.x.shape)
    grad_y = buf(want[2], *u.targets.shape)
    grad_lr_part = _launch.new_output((NV, B, T, n), f32, device)
    grad_queries_part = buf(want[7], NV, B, T, m, d_in)
    if want[1] and first_order:
        grad_x_part.zero_()
    if want[2] and first_order:
        grad_y.zero_()
    if want[7] and not u.has_queries:
        grad_queries_part.zero_()
    if B > 0:
        starts_w = torch.empty(B, u.NC, d_in, d_out, dtype=f32, device=device)
        starts_b = torch.empty(B, u.NC, d_out, dtype=f32, device=device) if u.bias is not None \
            else None
        if u.bias is not None:
            grad_bias_final = (torch.zeros(B, d_out, dtype=dtype, device=device)
                               if grad_bias_final is None else grad_bias_final.contiguous())
        if u.has_queries:
            grad_readout = (torch.zeros(B, T, m, d_out, dtype=dtype, device=device)
                            if grad_readout is None else grad_readout.contiguous())
        d = u.or_dummy
        _launch.launch(
            fast_weight_chunked_bwd_kernel, (B, NV),
            u.weight, d(u.bias), u.x, u.lr, d(u.queries), residual.contiguous(),
            grad_weight_final.contiguous(), d(grad_bias_final if u.bias is not None else None),
            d(grad_readout if u.has_queries else None), starts_w, d(starts_b),
            grad_weight, d(grad_bias), d(grad_x_part), d(grad_y), grad_lr_part,
            d(grad_queries_part),
            _launch.task_stride(u.weight, 3),
            _launch.task_stride(u.bias, 2) if u.bias is not None else 0,
            u.x.stride(0), B, T, n, m, d_in, d_out, u.CS, u.NC,
            FIRST_ORDER=bool(first_order), WANT_X=want[1] and not first_order,
            WANT_Y=want[2] and not first_order, WANT_QUERIES=want[7] and u.has_queries,
            **u.common())

    def finish(need, t, summed):
        if not need:
            return _launch.no_output(u.weight)
        return (t.sum(0) if summed else t).to(dtype)

    return [
        finish(want[0], grad_weight, u.weight.dim() == 2),
        finish(want[1], grad_x_part, True),
        finish(want[2], grad_y, False),
        finish(want[3], grad_lr_part.sum((0, 3)), False),
        finish(want[4], grad_bias, u.bias is not None and u.bias.dim() == 1),
        _launch.no_output(u.weight),
        _launch.no_output(u.weight),
        finish(want[7], grad_queries_part, True),
    ]


# --- which kernels a call runs (the triton backend's counterpart of the cpu binding's choice) ----

# Force the chunked kernels on (1) or off (0) instead of chunked_expected's size rule (-1).
_FORCE = -1


def set_chunked_knobs(force: int, rows: int) -> None:
    """The chunked kernels' knobs, as the cpu module's: force them on (1), off (0) or leave them
    to the size rule (-1), and the stacked rows of a chunk (a power of two ≥ 16)."""
    global _FORCE, CHUNK_ROWS
    _FORCE, CHUNK_ROWS = int(force), int(rows)


def chunked_expected(steps: int, n: int, d_in: int, d_out: int, m: int = 0,
                     wants_states: bool = True) -> bool:
    """Whether the chunked kernels run at these sizes when they apply: n ≤ 16 (a chunk then
    holds at least CHUNK_ROWS // 16 steps), and T ≥ 2 unless the backward wants W_t (x's or the
    queries' gradient: checkpointed segments, down to one step, must then take the chunked
    backward the call was planned for). Not yet measured on a GPU (bench/gpu/check.sh times
    the chunked and step kernels on delta-rule)."""
    if _FORCE >= 0:
        return _FORCE == 1
    return n <= 16 and (wants_states or steps >= 2)


def _runs_chunked(weight, x, lr, loss, lr_scale, bias_lr_scale, wants_states) -> bool:
    return (lr.shape[0] > 0 and chunked_applies(x, loss, lr_scale, bias_lr_scale)
            and chunked_expected(lr.shape[1], x.shape[-2], weight.shape[-2], weight.shape[-1],
                                 wants_states=wants_states))


def unroll_forward(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                   store_states):
    """metakernels/_C.pyi's unroll_forward: the chunked kernels where they apply and no W_t is
    to be stored, else the step kernels."""
    from metakernels.triton import fast_weight_unroll as steps
    if not store_states and _runs_chunked(weight, x, lr, loss, lr_scale, bias_lr_scale, False):
        return chunked_forward(weight, x, targets, lr, bias, queries)
    return steps.unroll_forward(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries,
                                loss, store_states)


def unroll_backward(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, residual,
                    states, weight_final, grad_weight_final, grad_bias_final, grad_readout, loss,
                    first_order, wanted):
    """metakernels/_C.pyi's unroll_backward: the chunked kernels where they apply (they read no
    W_t) unless bias_lr_scale's gradient is wanted, else the step kernels."""
    from metakernels.triton import fast_weight_unroll as steps
    wants_states = (wanted[1] and not first_order) or wanted[7]
    if not wanted[6] and _runs_chunked(weight, x, lr, loss, lr_scale, bias_lr_scale,
                                       wants_states):
        return chunked_backward(weight, x, targets, lr, bias, queries, residual,
                                grad_weight_final, grad_bias_final, grad_readout, first_order,
                                wanted)
    return steps.unroll_backward(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries,
                                 residual, states, weight_final, grad_weight_final,
                                 grad_bias_final, grad_readout, loss, first_order, wanted)


def unroll_path(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                store_states, grad_bias_lr_scale, wants_states=True) -> str:
    """"chunked", "steps" or "steps/chunked" (forward/backward), as the cpu module's."""
    forward = ("chunked" if not store_states and _runs_chunked(
        weight, x, lr, loss, lr_scale, bias_lr_scale, False) else "steps")
    backward = ("chunked" if not grad_bias_lr_scale and _runs_chunked(
        weight, x, lr, loss, lr_scale, bias_lr_scale, wants_states) else "steps")
    return forward if forward == backward else f"{forward}/{backward}"
