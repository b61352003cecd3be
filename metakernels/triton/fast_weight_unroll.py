"""Triton kernels of ``fast_weight_unroll`` (docs/ops/fast_weight_unroll.md): forward and exact
second-order backward, every task's fast weights in registers across all T steps.

Grid ``(B, NV)``: program ``(b, v)`` owns task b and the d_out columns ``[v·BV, (v+1)·BV)``, all of
d_in and all n support rows. For mse the columns are independent (each column's W, b, E and the
adjoints Ŵ, b̂ only ever meet their own column), so NV = ceil(d_out / BV); for ce the softmax
couples a row's columns, so BV covers d_out and NV = 1. Quantities that sum over d_out (the loss,
η̂, X̂, Q̂) are written per column tile to a float32 buffer ``[NV, ...]`` and summed afterwards.

Stored for the backward: the residual ``E_t`` of every step, ``[B, T, n, d_out]`` float32, always;
and ``W_t`` of every step, ``[B, T, d_in, d_out]`` float32, only when ``store_states`` (x's
gradient in second order, or the queries' gradient). The backward recomputes ``G_t = X_tᵀ E_t``
and ``W_{t+1} = W_t − η_t P∘G_t`` from them; ce's softmax comes back as ``n E_t + onehot``.

Limits: a task's [d_in, BV], [n, d_in] and [m, d_in] tiles (padded to powers of two, at least
16) must each fit in MAX_TILE = 16384 float32 (e.g. d_in = n = 128); ce needs [d_in, d_out] within
it too. Larger shapes raise RuntimeError naming the tile (no tiling over n or d_in here), and so
does a launch that needs more shared memory than the card has (float32 inputs stage tl.dot
operands there: on sm_90, d_in = d_out = 128 ce, or n = 128 with m = 128, is past it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metakernels.triton import _launch


@triton.jit
def _softmax_rows(b_z, m_n, m_v):
    """Row softmax of the valid [n, d_out] part of b_z; padded rows and columns give 0."""
    b_zm = tl.where(m_v[None, :], tl.where(m_n[:, None], b_z, 0.0), float("-inf"))
    b_max = tl.max(b_zm, 1)
    b_exp = tl.exp(b_zm - b_max[:, None])
    b_sum = tl.sum(b_exp, 1)
    return b_exp / b_sum[:, None], b_max + tl.log(b_sum)


@triton.jit
def _ce_hessian(b_p, b_u, n):
    """ẑ_i = (p_i ∘ u_i − p_i (p_iᵀ u_i)) / n: the softmax Jacobian over n applied to each row."""
    b_pu = b_p * b_u
    return (b_pu - b_p * tl.sum(b_pu, 1)[:, None]) / n


@triton.jit
def _column_tile(i_v, n, d_in, d_out, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The offsets and masks of column tile i_v that every kernel starts from: the support rows
    o_n < n, the inputs o_k < d_in, the tile's columns o_v < d_out, and W's [d_in, BV] offsets."""
    o_n = tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_n = o_n < n
    m_k = o_k < d_in
    m_v = o_v < d_out
    m_nv = m_n[:, None] & m_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * d_out + o_v[None, :]
    return o_n, o_k, o_v, m_n, m_k, m_v, m_nv, m_kv, o_kv


@triton.jit
def fast_weight_unroll_fwd_kernel(
    p_weight, p_bias, p_x, p_y, p_lr, p_lr_scale, p_bias_lr_scale, p_queries,
    p_weight_out, p_bias_out, p_losses, p_readout, p_residual, p_states,
    s_w_b, s_b_b, s_x_b, s_x_t, s_y_b, s_y_t,
    B, T, n, m, d_in, d_out,
    LOSS_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR_SCALE: tl.constexpr,
    HAS_BIAS_LR_SCALE: tl.constexpr, HAS_QUERIES: tl.constexpr, STORE_STATES: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # int64 task and tile indices: B·T·d_in·d_out offsets pass 2^31 at realistic sizes.
    i_b = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n, o_k, o_v, m_n, m_k, m_v, m_nv, m_kv, o_kv = _column_tile(i_v, n, d_in, d_out, BN, BK, BV)
    o_m = tl.arange(0, BM)
    m_nk = m_n[:, None] & m_k[None, :]

    b_w = tl.load(p_weight + i_b * s_w_b + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_b = tl.load(p_bias + i_b * s_b_b + o_v, mask=m_v, other=0.0).to(tl.float32)
    if HAS_LR_SCALE:
        b_scale = tl.load(p_lr_scale + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_BIAS_LR_SCALE:
        b_bscale = tl.load(p_bias_lr_scale + o_v, mask=m_v, other=0.0).to(tl.float32)

    for i_t in range(0, T):
        p_x_t = p_x + i_b * s_x_b + i_t * s_x_t
        b_x = tl.load(p_x_t + o_n[:, None] * d_in + o_k[None, :], mask=m_nk, other=0.0
                      ).to(tl.float32)
        b_z = tl.dot(b_x, b_w, input_precision=PRECISION)
        if HAS_BIAS:
            b_z += b_b[None, :]
        if LOSS_CE:
            b_label = tl.load(p_y + i_b * s_y_b + i_t * s_y_t + o_n, mask=m_n, other=0)
            b_onehot = ((o_v[None, :] == b_label[:, None]) & m_nv).to(tl.float32)
            b_p, b_lse = _softmax_rows(b_z, m_n, m_v)
            b_zy = tl.sum(b_onehot * b_z, 1)
            b_loss = tl.sum(tl.where(m_n, b_lse - b_zy, 0.0)) / n
            b_e = tl.where(m_nv, (b_p - b_onehot) / n, 0.0)
        else:
            b_y = tl.load(p_y + i_b * s_y_b + i_t * s_y_t + o_n[:, None] * d_out + o_v[None, :],
                          mask=m_nv, other=0.0).to(tl.float32)
            b_r = tl.where(m_nv, b_z - b_y, 0.0)
            b_loss = tl.sum(b_r * b_r) / (2 * n)
            b_e = b_r / n
        o_bt = i_b * T + i_t
        tl.store(p_losses + (i_v * B + i_b) * T + i_t, b_loss)
        tl.store(p_residual + (o_bt * n + o_n[:, None]) * d_out + o_v[None, :], b_e, mask=m_nv)
        if STORE_STATES:
            tl.store(p_states + o_bt * d_in * d_out + o_kv, b_w, mask=m_kv)

        b_lr = tl.load(p_lr + o_bt).to(tl.float32)
        b_g = tl.dot(tl.trans(b_x), b_e, input_precision=PRECISION)
        if HAS_LR_SCALE:
            b_g = b_scale * b_g
        b_w -= b_lr * b_g
        if HAS_BIAS:
            b_gb = tl.sum(b_e, 0)
            if HAS_BIAS_LR_SCALE:
                b_gb = b_bscale * b_gb
            b_b -= b_lr * b_gb
        if HAS_QUERIES:
            m_mk = (o_m < m)[:, None] & m_k[None, :]
            b_q = tl.load(p_queries + (o_bt * m + o_m[:, None]) * d_in + o_k[None, :], mask=m_mk,
                          other=0.0).to(tl.float32)
            b_o = tl.dot(b_q, b_w, input_precision=PRECISION)
            if HAS_BIAS:
                b_o += b_b[None, :]
            m_mv = (o_m < m)[:, None] & m_v[None, :]
            tl.store(p_readout + (o_bt * m + o_m[:, None]) * d_out + o_v[None, :],
                     b_o.to(p_readout.dtype.element_ty), mask=m_mv)

    tl.store(p_weight_out + i_b * d_in * d_out + o_kv, b_w.to(p_weight_out.dtype.element_ty),
             mask=m_kv)
    if HAS_BIAS:
        tl.store(p_bias_out + i_b * d_out + o_v, b_b.to(p_bias_out.dtype.element_ty), mask=m_v)


@triton.jit
def fast_weight_unroll_bwd_kernel(
    p_x, p_y, p_lr, p_lr_scale, p_bias_lr_scale, p_queries, p_residual, p_states,
    p_grad_weight_final, p_grad_bias_final, p_grad_readout,
    p_grad_weight, p_grad_bias, p_grad_lr_scale, p_grad_bias_lr_scale, p_grad_y,
    p_grad_x_part, p_grad_lr_part, p_grad_queries_part,
    s_x_b, s_x_t, s_y_b, s_y_t,
    B, T, n, m, d_in, d_out,
    LOSS_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR_SCALE: tl.constexpr,
    HAS_BIAS_LR_SCALE: tl.constexpr, HAS_QUERIES: tl.constexpr, X_PER_STEP: tl.constexpr,
    FIRST_ORDER: tl.constexpr, HAS_STATES: tl.constexpr,
    WANT_WEIGHT: tl.constexpr, WANT_X: tl.constexpr, WANT_Y: tl.constexpr,
    WANT_BIAS: tl.constexpr, WANT_LR_SCALE: tl.constexpr, WANT_BIAS_LR_SCALE: tl.constexpr,
    WANT_QUERIES: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n, o_k, o_v, m_n, m_k, m_v, m_nv, m_kv, o_kv = _column_tile(i_v, n, d_in, d_out, BN, BK, BV)
    o_m = tl.arange(0, BM)
    m_nk = m_n[:, None] & m_k[None, :]
    m_mk = (o_m < m)[:, None] & m_k[None, :]
    o_nv = o_n[:, None] * d_out + o_v[None, :]
    o_nk = o_n[:, None] * d_in + o_k[None, :]

    # The adjoints Ŵ_t, b̂_t of this column tile, from Ŵ_T, b̂_T.
    b_wh = tl.load(p_grad_weight_final + i_b * d_in * d_out + o_kv, mask=m_kv, other=0.0
                   ).to(tl.float32)
    if HAS_BIAS:
        b_bh = tl.load(p_grad_bias_final + i_b * d_out + o_v, mask=m_v, other=0.0).to(tl.float32)
    if HAS_LR_SCALE:
        b_scale = tl.load(p_lr_scale + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_BIAS_LR_SCALE:
        b_bscale = tl.load(p_bias_lr_scale + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_grad_scale = tl.zeros([BK, BV], dtype=tl.float32)
    b_grad_bscale = tl.zeros([BV], dtype=tl.float32)
    # With 3-D x (the same X every step) X̂ = Σ_t X̂_t and Ŷ = Σ_t Ŷ_t stay in registers.
    b_gx_sum = tl.zeros([BN, BK], dtype=tl.float32)
    b_gy_sum = tl.zeros([BN, BV], dtype=tl.float32)

    for i_r in range(0, T):
        i_t = T - 1 - i_r
        o_bt = i_b * T + i_t
        o_part = (i_v * B + i_b) * T + i_t
        b_x = tl.load(p_x + i_b * s_x_b + i_t * s_x_t + o_nk, mask=m_nk, other=0.0
                      ).to(tl.float32)
        b_e = tl.load(p_residual + o_bt * n * d_out + o_nv, mask=m_nv, other=0.0)    # E_t
        b_lr = tl.load(p_lr + o_bt).to(tl.float32)
        b_g = tl.dot(tl.trans(b_x), b_e, input_precision=PRECISION)    # G_t
        b_pg = b_g
        if HAS_LR_SCALE:
            b_pg = b_scale * b_g                                          # P ∘ G_t
        if HAS_BIAS:
            b_gb = tl.sum(b_e, 0)                                         # g_t
            b_pgb = b_gb
            if HAS_BIAS_LR_SCALE:
                b_pgb = b_bscale * b_gb
        if HAS_STATES:
            b_w = tl.load(p_states + o_bt * d_in * d_out + o_kv, mask=m_kv, other=0.0)  # W_t

        if HAS_QUERIES:
            m_mv = (o_m < m)[:, None] & m_v[None, :]
            b_oh = tl.load(p_grad_readout + (o_bt * m + o_m[:, None]) * d_out + o_v[None, :],
                           mask=m_mv, other=0.0).to(tl.float32)
            b_q = tl.load(p_queries + (o_bt * m + o_m[:, None]) * d_in + o_k[None, :],
                          mask=m_mk, other=0.0).to(tl.float32)
            b_wh += tl.dot(tl.trans(b_q), b_oh, input_precision=PRECISION)
            if HAS_BIAS:
                b_bh += tl.sum(b_oh, 0)
            if WANT_QUERIES:
                b_w_next = b_w - b_lr * b_pg                              # W_{t+1}
                b_gq = tl.dot(b_oh, tl.trans(b_w_next), input_precision=PRECISION)
                tl.store(p_grad_queries_part + (o_part * m + o_m[:, None]) * d_in + o_k[None, :],
                         b_gq, mask=m_mk)

        b_eta = -tl.sum(b_wh * b_pg)
        if HAS_BIAS:
            b_eta -= tl.sum(b_bh * b_pgb)
        tl.store(p_grad_lr_part + o_part, b_eta)
        if WANT_LR_SCALE:
            b_grad_scale -= b_lr * b_wh * b_g
        if WANT_BIAS_LR_SCALE:
            b_grad_bscale -= b_lr * b_bh * b_gb

        if not FIRST_ORDER:
            b_dir = b_wh                                                  # D = P ∘ Ŵ_{t+1}
            if HAS_LR_SCALE:
                b_dir = b_scale * b_wh
            b_u = tl.dot(b_x, b_dir, input_precision=PRECISION)           # U = X D + 1 dᵀ
            if HAS_BIAS:
                b_bdir = b_bh
                if HAS_BIAS_LR_SCALE:
                    b_bdir = b_bscale * b_bh
                b_u += b_bdir[None, :]
            b_eh = -b_lr * b_u                                            # Ê
            if LOSS_CE:
                b_label = tl.load(p_y + i_b * s_y_b + i_t * s_y_t + o_n, mask=m_n, other=0)
                b_onehot = ((o_v[None, :] == b_label[:, None]) & m_nv).to(tl.float32)
                b_p = tl.where(m_nv, n * b_e + b_onehot, 0.0)          # softmax(Z_t)
                b_zh = _ce_hessian(b_p, b_eh, n)
            else:
                b_zh = b_eh / n
            b_zh = tl.where(m_nv, b_zh, 0.0)                              # Ẑ
            if WANT_Y:
                if X_PER_STEP:
                    tl.store(p_grad_y + o_bt * n * d_out + o_nv, -b_zh, mask=m_nv)
                else:
                    b_gy_sum -= b_zh
            if WANT_X:
                b_gx = tl.dot(b_zh, tl.trans(b_w), input_precision=PRECISION)
                b_gx -= b_lr * tl.dot(b_e, tl.trans(b_dir), input_precision=PRECISION)
                if X_PER_STEP:
                    tl.store(p_grad_x_part + o_part * n * d_in + o_nk, b_gx, mask=m_nk)
                else:
                    b_gx_sum += b_gx
            b_wh += tl.dot(tl.trans(b_x), b_zh, input_precision=PRECISION)
            if HAS_BIAS:
                b_bh += tl.sum(b_zh, 0)

    if WANT_WEIGHT:
        tl.store(p_grad_weight + i_b * d_in * d_out + o_kv, b_wh, mask=m_kv)
    if WANT_BIAS:
        tl.store(p_grad_bias + i_b * d_out + o_v, b_bh, mask=m_v)
    if WANT_LR_SCALE:
        tl.store(p_grad_lr_scale + i_b * d_in * d_out + o_kv, b_grad_scale, mask=m_kv)
    if WANT_BIAS_LR_SCALE:
        tl.store(p_grad_bias_lr_scale + i_b * d_out + o_v, b_grad_bscale, mask=m_v)
    if not X_PER_STEP:
        if WANT_X:
            tl.store(p_grad_x_part + (i_v * B + i_b) * n * d_in + o_nk, b_gx_sum, mask=m_nk)
        if WANT_Y:
            tl.store(p_grad_y + i_b * n * d_out + o_nv, b_gy_sum, mask=m_nv)


class _Unroll:
    """The inputs of one call made contiguous, with the sizes and block sizes of the kernels."""

    def __init__(self, weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss):
        self.weight = weight.contiguous()
        self.x = x.contiguous()
        self.targets = targets.contiguous()
        self.lr = lr.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.lr_scale = None if lr_scale is None else lr_scale.contiguous()
        self.bias_lr_scale = None if bias_lr_scale is None else bias_lr_scale.contiguous()
        self.queries = None if queries is None else queries.contiguous()
        self.ce = loss == 1
        self.per_step = self.x.dim() == 4
        self.tasks, self.steps = self.lr.shape
        self.support, self.d_in = self.x.shape[-2], self.x.shape[-1]
        self.d_out = self.weight.shape[-1]
        self.rows = self.queries.shape[2] if self.queries is not None else 0
        self.has_queries = self.rows > 0
        self.BN = _launch.block(self.support)
        self.BK = _launch.block(self.d_in)
        self.BV = _launch.column_block(self.d_in, self.d_out, whole_rows=self.ce)
        self.BM = _launch.block(self.rows)
        self.NV = triton.cdiv(self.d_out, self.BV)
        _launch.check_fits(weight=(self.BK, self.BV), x=(self.BN, self.BK),
                           residual=(self.BN, self.BV),
                           queries=(self.BM if self.has_queries else 1, self.BK))
        self.num_warps = _launch.num_warps(self.BK * self.BV, self.BN * self.BK,
                                           self.BN * self.BV)
        self.precision = _launch.dot_precision(self.weight.dtype)

    def strides(self):
        s_x_t = self.x.stride(1) if self.per_step else 0
        s_y_t = self.targets.stride(1) if self.per_step else 0
        return self.x.stride(0), s_x_t, self.targets.stride(0), s_y_t

    def common(self):
        return dict(LOSS_CE=self.ce, HAS_BIAS=self.bias is not None,
                    HAS_LR_SCALE=self.lr_scale is not None,
                    HAS_BIAS_LR_SCALE=self.bias_lr_scale is not None,
                    HAS_QUERIES=self.has_queries, BN=self.BN, BK=self.BK, BV=self.BV, BM=self.BM,
                    PRECISION=self.precision, num_warps=self.num_warps)

    def or_dummy(self, t):
        """Triton wants a tensor for every pointer; absent inputs get one that is never read."""
        return self.weight if t is None else t


def unroll_forward(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                   store_states):
    """(W_T, b_T or [0], losses [B, T], readout or [0], residual E_t, states W_t or [0]); the
    signature and conventions of metakernels/_C.pyi."""
    u = _Unroll(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss)
    B, T, n, d_in, d_out = u.tasks, u.steps, u.support, u.d_in, u.d_out
    dtype, device = u.weight.dtype, u.weight.device
    out = lambda *shape, dt=dtype: _launch.new_output(shape, dt, device)  # noqa: E731
    weight_out = out(B, d_in, d_out)
    bias_out = out(B, d_out) if bias is not None else _launch.no_output(u.weight)
    readout = out(B, T, u.rows, d_out) if queries is not None else _launch.no_output(u.weight)
    residual = out(B, T, n, d_out, dt=torch.float32)
    states = (out(B, T, d_in, d_out, dt=torch.float32) if store_states
              else torch.empty(0, dtype=torch.float32, device=device))
    losses_part = out(u.NV, B, T, dt=torch.float32)
    if B > 0:
        s_x_b, s_x_t, s_y_b, s_y_t = u.strides()
        _launch.launch(
            fast_weight_unroll_fwd_kernel, (B, u.NV),
            u.weight, u.or_dummy(u.bias), u.x, u.targets, u.lr, u.or_dummy(u.lr_scale),
            u.or_dummy(u.bias_lr_scale), u.or_dummy(u.queries),
            weight_out, u.or_dummy(bias_out if bias is not None else None), losses_part,
            readout if u.has_queries else u.weight, residual,
            states if store_states else residual,
            _launch.task_stride(u.weight, 3),
            _launch.task_stride(u.bias, 2) if u.bias is not None else 0,
            s_x_b, s_x_t, s_y_b, s_y_t, B, T, n, u.rows, d_in, d_out,
            STORE_STATES=bool(store_states), **u.common())
    losses = losses_part.sum(0).to(dtype)
    return [weight_out, bias_out, losses, readout, residual, states]


def unroll_backward(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, residual,
                    states, weight_final, grad_weight_final, grad_bias_final, grad_readout, loss,
                    first_order, wanted):
    """The 8 gradients (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries), each an empty
    tensor where not ``wanted``; shared inputs summed over tasks (metakernels/_C.pyi).
    ``weight_final`` is not read: the kernel rebuilds W_{t+1} from the float32 W_t, where the
    half-precision W_T output would lose digits."""
    if len(wanted) != 8:
        raise RuntimeError("metakernels internal error: unroll_backward takes 8 flags")
    u = _Unroll(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss)
    B, T, n, m, d_in, d_out, NV = u.tasks, u.steps, u.support, u.rows, u.d_in, u.d_out, u.NV
    dtype, device = u.weight.dtype, u.weight.device
    want = [bool(w) for w in wanted]
    want[2] = want[2] and not u.ce
    has_states = (want[1] and not first_order) or (want[7] and u.has_queries)
    if has_states and states.dim() != 4:
        raise RuntimeError("metakernels internal error: the backward needs the stored fast "
                           "weights")
    f32 = torch.float32
    buf = lambda need, *shape: _launch.new_output(shape, f32, device) if need else None  # noqa
    grad_weight = buf(want[0], B, d_in, d_out)
    grad_x_part = buf(want[1], NV, *u.x.shape)
    grad_y = buf(want[2], *u.targets.shape)
    grad_lr_part = _launch.new_output((NV, B, T), f32, device)
    grad_bias = buf(want[4], B, d_out)
    grad_lr_scale = buf(want[5], B, d_in, d_out)
    grad_bias_lr_scale = buf(want[6], B, d_out)
    grad_queries_part = buf(want[7], NV, B, T, m, d_in)
    if want[1] and first_order:
        grad_x_part.zero_()
    if want[2] and first_order:
        grad_y.zero_()

    if B > 0:
        grad_weight_final = grad_weight_final.contiguous()
        if u.bias is not None:
            grad_bias_final = (torch.zeros(B, d_out, dtype=dtype, device=device)
                               if grad_bias_final is None else grad_bias_final.contiguous())
        if u.has_queries:
            grad_readout = (torch.zeros(B, T, m, d_out, dtype=dtype, device=device)
                            if grad_readout is None else grad_readout.contiguous())
        s_x_b, s_x_t, s_y_b, s_y_t = u.strides()
        d = u.or_dummy
        _launch.launch(
            fast_weight_unroll_bwd_kernel, (B, NV),
            u.x, u.targets, u.lr, d(u.lr_scale), d(u.bias_lr_scale), d(u.queries),
            residual.contiguous(), states.contiguous() if has_states else residual,
            grad_weight_final, d(grad_bias_final if u.bias is not None else None),
            d(grad_readout if u.has_queries else None),
            d(grad_weight), d(grad_bias), d(grad_lr_scale), d(grad_bias_lr_scale), d(grad_y),
            d(grad_x_part), grad_lr_part, d(grad_queries_part),
            s_x_b, s_x_t, s_y_b, s_y_t, B, T, n, m, d_in, d_out,
            X_PER_STEP=u.per_step, FIRST_ORDER=bool(first_order), HAS_STATES=has_states,
            WANT_WEIGHT=want[0], WANT_X=want[1] and not first_order,
            WANT_Y=want[2] and not first_order, WANT_BIAS=want[4], WANT_LR_SCALE=want[5],
            WANT_BIAS_LR_SCALE=want[6], WANT_QUERIES=want[7] and u.has_queries, **u.common())
    if want[7] and not u.has_queries:
        grad_queries_part.zero_()  # m = 0 rows: nothing to write

    def finish(need, t, summed):
        if not need:
            return _launch.no_output(u.weight)  # a fresh one each: outputs may not alias
        return (t.sum(0) if summed else t).to(dtype)

    return [
        finish(want[0], grad_weight, u.weight.dim() == 2),
        finish(want[1], grad_x_part, True),
        finish(want[2], grad_y, False),
        finish(want[3], grad_lr_part, True),
        finish(want[4], grad_bias, u.bias is not None and u.bias.dim() == 1),
        finish(want[5], grad_lr_scale, True),
        finish(want[6], grad_bias_lr_scale, True),
        finish(want[7], grad_queries_part, True),
    ]
