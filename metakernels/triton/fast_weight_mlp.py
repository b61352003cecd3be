"""Triton kernels of the MLP fast-weight ops (docs/ops/fast_weight_mlp.md): an L-layer perceptron
whose every layer adapts by SGD for T steps, forward and exact second-order backward.

Grid ``(B,)``: program b owns task b, all of its layers, all n support rows and m query rows.
The parameters θ of a task are packed, in float32, into one vector of P numbers,
``[W_0, b_0, W_1, b_1, …]`` (each W_l row-major ``[d_l, d_{l+1}]``; no b_l without biases), and
the table ``layers [L, 4] = (d_l, d_{l+1}, offset of W_l, offset of b_l)`` tells a kernel where a
layer is. A layer loop therefore runs for any L with tiles of one shape: every weight tile is
``[BD, BD]`` and every activation tile ``[BN, BD]`` (support) or ``[BM, BD]`` (queries), with
``BD`` the padded power of two (≥ 16) of the widest layer. The fast weights live in a float32
global-memory workspace of the task (θ_t, θ_{t+1}, the adjoint θ̂), read and written a layer at
a time, and the per-layer pre-activations ``A_l`` of the current step in a scratch buffer
``[B, L, BN, BD]``; ``tl.debug_barrier()`` orders a program's writes before its reads.

Forward, per step: the network on X_t (A_l kept), the loss and E_t, backpropagation with each
layer updated in place as soon as its weights have served (all layers step from θ_t), then the
readout at θ_{t+1}. Stored for the backward: θ_t of every step, ``[B, T, P]`` float32
(``store_states``; without it the backward cannot run). Nothing else is stored: the backward
recomputes the step's forward from θ_t.

Backward, per step t = T−1 … 0, with θ̂ the adjoint of θ_{t+1} (the maths: the docs page):

1. the network at θ_t on X_t (A_l), E_t, and backpropagation: every G_l, g_l (kept in a scratch
   vector) and θ_{t+1} = θ_t − η_t P∘G (scratch);
2. the readout at θ_{t+1} and its backpropagation: θ̂ += ∂⟨Ô_t, O_t⟩/∂θ_{t+1}, Q̂_t;
3. η̂_t = −⟨θ̂, P∘G⟩ and P̂ += −η_t θ̂∘G;
4. unless first order, the R-operator in the direction V = P∘θ̂ (biases unscaled): forward
   ``R{A_l} = R{H_l} W_l + H_l D_l + 1 d_lᵀ``, ``R{H_{l+1}} = σ'(A_l)∘R{A_l}``, ``R{E}`` from
   ``R{Z}``; then backward ``R{Δ_{l−1}} = (R{Δ_l} W_lᵀ + Δ_l D_lᵀ)∘σ'(A_{l−1})
   + (Δ_l W_lᵀ)∘σ''(A_{l−1})∘R{A_{l−1}}``, ``R{G_l} = R{H_l}ᵀ Δ_l + H_lᵀ R{Δ_l}``,
   ``R{g_l} = 1ᵀ R{Δ_l}``; θ̂ −= η_t R{∇_θ ℓ} (the Hessian-vector product),
   X̂_t −= η_t (R{Δ_0} W_0ᵀ + Δ_0 D_0ᵀ), and for mse Ŷ_t += η_t R{Z}/n.

Limits: ``BD² ≤ MAX_TILE`` (widths up to 128), ``BN·BD`` and ``BM·BD ≤ MAX_TILE`` (e.g. n ≤ 128
at width 128); :func:`mlp_unsupported_reason` says why a shape is outside them, so that the ops
layer falls back to another backend; the launchers raise RuntimeError there too. ttt-mlp
(64 → 256 → 64) is outside them. Within them, a launch that needs more shared memory than the
card has raises RuntimeError (_launch.launch): float32 at width 128 (n = m = 16) needs 172 KB in
the backward, which sm_90 has and sm_80 has not. Activations: relu, tanh, gelu (erf form), silu.

Meta-loss mode (``query_y`` given): the outer loss and its residual Ê are computed in PyTorch
(plain tensor ops, no autograd) from the network at θ_T (form A; float32, recomputed from the
last stored θ in the backward) or the kernels' readout of every step (form B; the backward
re-runs the forward kernel for them, segment by segment); the backward kernel backpropagates
c·Ê as a readout adjoint (form A: the last step's, with ``q_first``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metakernels.reference.fast_weight_mlp import ACTIVATIONS, mlp_apply
from metakernels.reference.meta_loss import _row_mean_loss
from metakernels.triton import _launch
from metakernels.triton.fast_weight_unroll import _ce_hessian, _softmax_rows


# --- the activation and its first two derivatives ------------------------------------------------
# ACT is the index in ACTIVATIONS: 0 relu, 1 tanh, 2 gelu (erf form), 3 silu.

@triton.jit
def _tanh(a):
    # tl has no tanh; this form does not overflow for large |a|.
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0, -t, t)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(a, 0.0)
    elif ACT == 1:
        return _tanh(a)
    elif ACT == 2:
        return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        return a * tl.sigmoid(a)


@triton.jit
def _act_d1(a, ACT: tl.constexpr):
    if ACT == 0:
        return (a > 0).to(tl.float32)   # torch's relu takes σ'(0) = 0
    elif ACT == 1:
        t = _tanh(a)
        return 1.0 - t * t
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        return cdf + a * pdf
    else:
        s = tl.sigmoid(a)
        return s * (1.0 + a * (1.0 - s))


@triton.jit
def _act_d2(a, ACT: tl.constexpr):
    if ACT == 0:
        return tl.zeros_like(a)
    elif ACT == 1:
        t = _tanh(a)
        return -2.0 * t * (1.0 - t * t)
    elif ACT == 2:
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        return pdf * (2.0 - a * a)
    else:
        s = tl.sigmoid(a)
        return s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))


# --- one layer's place in the packed θ -----------------------------------------------------------

@triton.jit
def _layer(p_layers, l, BD: tl.constexpr):
    """Offsets and masks of layer l's [BD, BD] weight tile and [BD] bias in the packed θ."""
    d_in = tl.load(p_layers + l * 4)
    d_out = tl.load(p_layers + l * 4 + 1)
    w_off = tl.load(p_layers + l * 4 + 2)
    b_off = tl.load(p_layers + l * 4 + 3)
    o_d = tl.arange(0, BD)
    o_w = w_off + o_d[:, None] * d_out + o_d[None, :]
    m_w = (o_d[:, None] < d_in) & (o_d[None, :] < d_out)
    return o_w, m_w, b_off + o_d, o_d < d_out


@triton.jit
def _network(p_theta, p_layers, p_acts, b_h, L, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
             KEEP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """The network at θ (``p_theta``) on the rows b_h [BR, BD]: its output Z [BR, BD]; with KEEP,
    every pre-activation A_l goes to p_acts [L, BR, BD]."""
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    o_rd = o_r[:, None] * BD + o_d[None, :]
    for l in range(0, L):
        o_w, m_w, o_b, m_b = _layer(p_layers, l, BD)
        b_w = tl.load(p_theta + o_w, mask=m_w, other=0.0)
        b_a = tl.dot(b_h, b_w, input_precision=PRECISION)
        if HAS_BIAS:
            b_a += tl.load(p_theta + o_b, mask=m_b, other=0.0)[None, :]
        if KEEP:
            tl.store(p_acts + l * BR * BD + o_rd, b_a)
        b_h = tl.where(l < L - 1, _act(b_a, ACT), b_a)
    return b_h


@triton.jit
def _inner_gradient(p_theta, p_layers, p_acts, p_grad, p_next, p_scale, b_x, b_delta, lr, L,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR_SCALE: tl.constexpr,
                    KEEP_GRAD: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Backpropagation of Δ_{L−1} = E through the network at θ_t (A_l in p_acts): writes
    θ_{t+1} = θ_t − lr·P∘G to p_next (which may be p_theta: each layer is read before it is
    written), and with KEEP_GRAD the raw G_l, g_l to p_grad."""
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    o_nd = o_n[:, None] * BD + o_d[None, :]
    for i_r in range(0, L):
        l = L - 1 - i_r
        o_w, m_w, o_b, m_b = _layer(p_layers, l, BD)
        l_prev = tl.maximum(l - 1, 0)
        b_a_prev = tl.load(p_acts + l_prev * BN * BD + o_nd)
        b_h = tl.where(l > 0, _act(b_a_prev, ACT), b_x)
        b_w = tl.load(p_theta + o_w, mask=m_w, other=0.0)
        b_g = tl.dot(tl.trans(b_h), b_delta, input_precision=PRECISION)
        if KEEP_GRAD:
            tl.store(p_grad + o_w, b_g, mask=m_w)
        if HAS_LR_SCALE:
            b_g = tl.load(p_scale + o_w, mask=m_w, other=0.0) * b_g
        tl.store(p_next + o_w, b_w - lr * b_g, mask=m_w)
        if HAS_BIAS:
            b_gb = tl.sum(b_delta, 0)
            if KEEP_GRAD:
                tl.store(p_grad + o_b, b_gb, mask=m_b)
            b_b = tl.load(p_theta + o_b, mask=m_b, other=0.0)
            tl.store(p_next + o_b, b_b - lr * b_gb, mask=m_b)
        b_delta = tl.dot(b_delta, tl.trans(b_w), input_precision=PRECISION) * _act_d1(b_a_prev,
                                                                                       ACT)


@triton.jit
def _loss_residual(b_z, p_y_t, o_n, o_d, n, d_last, LOSS_CE: tl.constexpr):
    """(ℓ, E, softmax P or E again) of the output rows b_z [BN, BD]; E is 0 outside [n, d_last]."""
    m_n = o_n < n
    m_v = o_d < d_last
    m_nv = m_n[:, None] & m_v[None, :]
    if LOSS_CE:
        b_label = tl.load(p_y_t + o_n, mask=m_n, other=0)
        b_onehot = ((o_d[None, :] == b_label[:, None]) & m_nv).to(tl.float32)
        b_p, b_lse = _softmax_rows(b_z, m_n, m_v)
        b_p = tl.where(m_nv, b_p, 0.0)
        b_loss = tl.sum(tl.where(m_n, b_lse - tl.sum(b_onehot * b_z, 1), 0.0)) / n
        b_e = tl.where(m_nv, (b_p - b_onehot) / n, 0.0)
    else:
        b_y = tl.load(p_y_t + o_n[:, None] * d_last + o_d[None, :], mask=m_nv, other=0.0
                      ).to(tl.float32)
        b_r = tl.where(m_nv, b_z - b_y, 0.0)
        b_loss = tl.sum(b_r * b_r) / (2 * n)
        b_e = b_r / n
        b_p = b_e
    return b_loss, b_e, b_p


@triton.jit
def fast_weight_mlp_fwd_kernel(
    p_theta, p_layers, p_x, p_y, p_lr, p_scale, p_queries,
    p_losses, p_readout, p_states, p_acts,
    s_x_b, s_x_t, s_y_b, s_y_t,
    T, L, n, m, d_first, d_last, P, stride, S,
    ACT: tl.constexpr, LOSS_CE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LR_SCALE: tl.constexpr, HAS_QUERIES: tl.constexpr, STORE_STATES: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    m_x = (o_n < n)[:, None] & (o_d < d_first)[None, :]
    p_th = p_theta + i_b * P                         # this task's θ, updated in place
    p_ac = p_acts + i_b * L * BN * BD

    for i_t in range(0, T):
        o_bt = i_b * T + i_t
        if STORE_STATES:    # θ_t at t = 0, stride, 2·stride, …
            m_keep = (o_f * 0 + i_t % stride) == 0      # a tensor: the interpreter wants one
            p_keep = p_states + (i_b * S + i_t // stride) * P
            for i_f in range(0, tl.cdiv(P, BF)):
                o_p = i_f * BF + o_f
                tl.store(p_keep + o_p, tl.load(p_th + o_p, mask=o_p < P), mask=(o_p < P) & m_keep)
        b_x = tl.load(p_x + i_b * s_x_b + i_t * s_x_t + o_n[:, None] * d_first + o_d[None, :],
                      mask=m_x, other=0.0).to(tl.float32)
        b_z = _network(p_th, p_layers, p_ac, b_x, L, ACT, HAS_BIAS, True, BN, BD, PRECISION)
        b_loss, b_e, _ = _loss_residual(b_z, p_y + i_b * s_y_b + i_t * s_y_t, o_n, o_d, n,
                                        d_last, LOSS_CE)
        tl.store(p_losses + o_bt, b_loss)
        tl.debug_barrier()
        b_lr = tl.load(p_lr + o_bt).to(tl.float32)
        _inner_gradient(p_th, p_layers, p_ac, p_th, p_th, p_scale, b_x, b_e, b_lr, L, ACT,
                        HAS_BIAS, HAS_LR_SCALE, False, BN, BD, PRECISION)
        tl.debug_barrier()
        if HAS_QUERIES:
            m_q = (o_m < m)[:, None] & (o_d < d_first)[None, :]
            b_q = tl.load(p_queries + (o_bt * m + o_m[:, None]) * d_first + o_d[None, :],
                          mask=m_q, other=0.0).to(tl.float32)
            b_o = _network(p_th, p_layers, p_ac, b_q, L, ACT, HAS_BIAS, False, BM, BD,
                           PRECISION)
            m_o = (o_m < m)[:, None] & (o_d < d_last)[None, :]
            tl.store(p_readout + (o_bt * m + o_m[:, None]) * d_last + o_d[None, :],
                     b_o.to(p_readout.dtype.element_ty), mask=m_o)


@triton.jit
def fast_weight_mlp_bwd_kernel(
    p_states, p_layers, p_x, p_y, p_lr, p_scale, p_queries, p_grad_readout,
    p_grad_theta, p_grad_lr, p_grad_scale, p_grad_x, p_grad_y, p_grad_queries,
    p_next, p_inner, p_acts, p_racts, p_qacts,
    s_x_b, s_x_t, s_y_b, s_y_t, s_q_b, s_q_t, s_o_b, s_o_t, q_first,
    T, L, n, m, d_first, d_last, P,
    ACT: tl.constexpr, LOSS_CE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LR_SCALE: tl.constexpr, HAS_QUERIES: tl.constexpr, X_PER_STEP: tl.constexpr,
    FIRST_ORDER: tl.constexpr, WANT_X: tl.constexpr, WANT_Y: tl.constexpr,
    WANT_SCALE: tl.constexpr, WANT_QUERIES: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_nd = o_n[:, None] * BD + o_d[None, :]
    o_md = o_m[:, None] * BD + o_d[None, :]
    m_x = (o_n < n)[:, None] & (o_d < d_first)[None, :]
    m_z = (o_n < n)[:, None] & (o_d < d_last)[None, :]
    p_gth = p_grad_theta + i_b * P      # θ̂: the adjoint of θ_T on entry, of θ_0 on exit
    p_nx = p_next + i_b * P             # θ_{t+1}
    p_gr = p_inner + i_b * P            # G_t, g_t unscaled
    p_ac = p_acts + i_b * L * BN * BD
    p_rac = p_racts + i_b * L * BN * BD
    p_qac = p_qacts + i_b * L * BM * BD
    b_gx_sum = tl.zeros([BN, BD], dtype=tl.float32)
    b_gy_sum = tl.zeros([BN, BD], dtype=tl.float32)

    for i_r in range(0, T):
        i_t = T - 1 - i_r
        o_bt = i_b * T + i_t
        p_th = p_states + o_bt * P       # θ_t
        b_lr = tl.load(p_lr + o_bt).to(tl.float32)
        b_x = tl.load(p_x + i_b * s_x_b + i_t * s_x_t + o_n[:, None] * d_first + o_d[None, :],
                      mask=m_x, other=0.0).to(tl.float32)
        p_y_t = p_y + i_b * s_y_b + i_t * s_y_t

        # 1. the step's forward at θ_t, its inner gradient and θ_{t+1}
        b_z = _network(p_th, p_layers, p_ac, b_x, L, ACT, HAS_BIAS, True, BN, BD, PRECISION)
        _, b_e, b_p = _loss_residual(b_z, p_y_t, o_n, o_d, n, d_last, LOSS_CE)
        tl.debug_barrier()
        _inner_gradient(p_th, p_layers, p_ac, p_gr, p_nx, p_scale, b_x, b_e, b_lr, L, ACT,
                        HAS_BIAS, HAS_LR_SCALE, True, BN, BD, PRECISION)
        tl.debug_barrier()

        # 2. the readout O_t = net(θ_{t+1}, Q_t): θ̂ += its backpropagation, Q̂_t; steps from
        #    q_first on (meta-loss form A: the last step only, Q the same each step: s_q_t = 0)
        if HAS_QUERIES:
            if i_t >= q_first:
                m_q = (o_m < m)[:, None] & (o_d < d_first)[None, :]
                o_q = i_b * s_q_b + i_t * s_q_t + o_m[:, None] * d_first + o_d[None, :]
                b_q = tl.load(p_queries + o_q, mask=m_q, other=0.0).to(tl.float32)
                _network(p_nx, p_layers, p_qac, b_q, L, ACT, HAS_BIAS, True, BM, BD,
                         PRECISION)
                tl.debug_barrier()
                m_o = (o_m < m)[:, None] & (o_d < d_last)[None, :]
                b_dq = tl.load(p_grad_readout + i_b * s_o_b + i_t * s_o_t + o_m[:, None] * d_last
                               + o_d[None, :], mask=m_o, other=0.0).to(tl.float32)
                for i_l in range(0, L):
                    l = L - 1 - i_l
                    o_w, m_w, o_b, m_b = _layer(p_layers, l, BD)
                    l_prev = tl.maximum(l - 1, 0)
                    b_a_prev = tl.load(p_qac + l_prev * BM * BD + o_md)
                    b_h = tl.where(l > 0, _act(b_a_prev, ACT), b_q)
                    b_gw = tl.load(p_gth + o_w, mask=m_w, other=0.0)
                    b_gw += tl.dot(tl.trans(b_h), b_dq, input_precision=PRECISION)
                    tl.store(p_gth + o_w, b_gw, mask=m_w)
                    if HAS_BIAS:
                        b_gb = tl.load(p_gth + o_b, mask=m_b, other=0.0) + tl.sum(b_dq, 0)
                        tl.store(p_gth + o_b, b_gb, mask=m_b)
                    b_w = tl.load(p_nx + o_w, mask=m_w, other=0.0)
                    b_back = tl.dot(b_dq, tl.trans(b_w), input_precision=PRECISION)
                    if WANT_QUERIES:
                        m_first = ((o_m * 0 + l) == 0)[:, None]     # Q̂_t at layer 0 only
                        tl.store(p_grad_queries + o_q, b_back, mask=m_q & m_first)
                    b_dq = b_back * _act_d1(b_a_prev, ACT)
                tl.debug_barrier()

        # 3. η̂_t = −⟨θ̂, P∘G⟩ and P̂ += −η_t θ̂∘G (biases have no P)
        b_eta = tl.zeros([BF], dtype=tl.float32)
        for i_f in range(0, tl.cdiv(P, BF)):
            o_p = i_f * BF + o_f
            m_p = o_p < P
            b_gth = tl.load(p_gth + o_p, mask=m_p, other=0.0)
            b_g = tl.load(p_gr + o_p, mask=m_p, other=0.0)
            b_wg = b_gth * b_g
            if HAS_LR_SCALE:
                b_eta += tl.load(p_scale + o_p, mask=m_p, other=0.0) * b_wg
            else:
                b_eta += b_wg
            if WANT_SCALE:
                p_gs = p_grad_scale + i_b * P + o_p
                tl.store(p_gs, tl.load(p_gs, mask=m_p, other=0.0) - b_lr * b_wg, mask=m_p)
        tl.store(p_grad_lr + o_bt, -tl.sum(b_eta))

        # 4. the Hessian-vector product in the direction V = P∘θ̂ (R-operator), and X̂_t, Ŷ_t
        if not FIRST_ORDER:
            b_h = b_x
            b_rh = tl.zeros([BN, BD], dtype=tl.float32)
            b_ra = tl.zeros([BN, BD], dtype=tl.float32)
            for l in range(0, L):
                o_w, m_w, o_b, m_b = _layer(p_layers, l, BD)
                b_w = tl.load(p_th + o_w, mask=m_w, other=0.0)
                b_dir = tl.load(p_gth + o_w, mask=m_w, other=0.0)
                if HAS_LR_SCALE:
                    b_dir = tl.load(p_scale + o_w, mask=m_w, other=0.0) * b_dir
                b_ra = (tl.dot(b_rh, b_w, input_precision=PRECISION)
                        + tl.dot(b_h, b_dir, input_precision=PRECISION))
                if HAS_BIAS:
                    b_ra += tl.load(p_gth + o_b, mask=m_b, other=0.0)[None, :]
                tl.store(p_rac + l * BN * BD + o_nd, b_ra)
                b_a = tl.load(p_ac + l * BN * BD + o_nd)
                b_h = _act(b_a, ACT)
                b_rh = _act_d1(b_a, ACT) * b_ra
            b_rz = tl.where(m_z, b_ra, 0.0)                            # R{Z}
            if LOSS_CE:
                b_re = tl.where(m_z, _ce_hessian(b_p, b_rz, n), 0.0)   # R{E}
            else:
                b_re = b_rz / n
                if WANT_Y:
                    if X_PER_STEP:
                        tl.store(p_grad_y + o_bt * n * d_last + o_n[:, None] * d_last
                                 + o_d[None, :], b_lr * b_re, mask=m_z)
                    else:
                        b_gy_sum += b_lr * b_re
            tl.debug_barrier()

            b_delta = b_e
            b_rdelta = b_re
            b_gx = tl.zeros([BN, BD], dtype=tl.float32)
            for i_l in range(0, L):
                l = L - 1 - i_l
                o_w, m_w, o_b, m_b = _layer(p_layers, l, BD)
                l_prev = tl.maximum(l - 1, 0)
                b_a_prev = tl.load(p_ac + l_prev * BN * BD + o_nd)
                b_ra_prev = tl.load(p_rac + l_prev * BN * BD + o_nd)
                b_d1 = _act_d1(b_a_prev, ACT)
                b_h = tl.where(l > 0, _act(b_a_prev, ACT), b_x)
                b_rh = tl.where(l > 0, b_d1 * b_ra_prev, 0.0)
                b_w = tl.load(p_th + o_w, mask=m_w, other=0.0)
                b_gw = tl.load(p_gth + o_w, mask=m_w, other=0.0)
                b_dir = b_gw
                if HAS_LR_SCALE:
                    b_dir = tl.load(p_scale + o_w, mask=m_w, other=0.0) * b_gw
                b_rg = (tl.dot(tl.trans(b_rh), b_delta, input_precision=PRECISION)
                        + tl.dot(tl.trans(b_h), b_rdelta, input_precision=PRECISION))
                tl.store(p_gth + o_w, b_gw - b_lr * b_rg, mask=m_w)
                if HAS_BIAS:
                    b_gb = tl.load(p_gth + o_b, mask=m_b, other=0.0)
                    tl.store(p_gth + o_b, b_gb - b_lr * tl.sum(b_rdelta, 0), mask=m_b)
                b_back = tl.dot(b_delta, tl.trans(b_w), input_precision=PRECISION)
                b_rback = (tl.dot(b_rdelta, tl.trans(b_w), input_precision=PRECISION)
                           + tl.dot(b_delta, tl.trans(b_dir), input_precision=PRECISION))
                b_gx = tl.where(l == 0, -b_lr * b_rback, b_gx)
                b_rdelta = b_rback * b_d1 + b_back * _act_d2(b_a_prev, ACT) * b_ra_prev
                b_delta = b_back * b_d1
            if WANT_X:
                if X_PER_STEP:
                    tl.store(p_grad_x + o_bt * n * d_first + o_n[:, None] * d_first
                             + o_d[None, :], b_gx, mask=m_x)
                else:
                    b_gx_sum += b_gx
        tl.debug_barrier()

    # 3-D x: X̂ = Σ_t X̂_t and Ŷ = Σ_t Ŷ_t, added to what the later segments left there.
    if not X_PER_STEP:
        if WANT_X:
            p_gx = p_grad_x + i_b * n * d_first + o_n[:, None] * d_first + o_d[None, :]
            tl.store(p_gx, tl.load(p_gx, mask=m_x, other=0.0) + b_gx_sum, mask=m_x)
        if WANT_Y:
            p_gy = p_grad_y + i_b * n * d_last + o_n[:, None] * d_last + o_d[None, :]
            tl.store(p_gy, tl.load(p_gy, mask=m_z, other=0.0) + b_gy_sum, mask=m_z)


# --- launchers: the interface of metakernels/_C.pyi (mlp_forward, mlp_backward) ------------------

def _padded(widths, n: int, m: int):
    return _launch.block(max(widths)), _launch.block(n), _launch.block(max(m, 1))


def mlp_unsupported_reason(widths, n: int, m: int) -> str | None:
    """Why the triton backend cannot run a network of layer ``widths`` (d_0, …, d_L) with ``n``
    support rows and ``m`` query rows a step (0: none), or None when it can. The ops ask before
    choosing this backend: ``auto`` falls back, ``backend="triton"`` raises this."""
    widths = [int(w) for w in widths]
    BD, BN, BM = _padded(widths, n, m)
    tiles = {"weight": (BD, BD), "support": (BN, BD), "query": (BM if m > 0 else 1, BD)}
    for name, (rows, cols) in tiles.items():
        if rows * cols > _launch.MAX_TILE:
            return (f"the triton backend holds every layer of a task in [{BD}, {BD}] tiles (the "
                    f"widest layer, {max(widths)}, padded to a power of two) and its {name} tile "
                    f"[{rows}, {cols}] exceeds {_launch.MAX_TILE} elements: it runs widths up to "
                    f"128, and up to {_launch.MAX_TILE // BD} support and query rows at this "
                    "width; use backend='cpu' or 'reference'")
    return None


def _launch_mlp(kernel, grid, *args, **kwargs) -> None:
    """_launch.launch, its too-much-shared-memory error naming the backends that run the MLP
    ops (the cuda backend has no MLP kernels)."""
    try:
        _launch.launch(kernel, grid, *args, **kwargs)
    except RuntimeError as error:
        if "more than the card has" not in str(error):
            raise
        raise RuntimeError(str(error).replace("backend='cuda', 'cpu' or 'reference'",
                                              "backend='cpu' or 'reference'")) from error


class _MLP:
    """One call's inputs (normalised by the ops: per-task layers, contiguous), the packed layout
    of θ (W_0 … W_{L−1}, then b_0 … b_{L−1}) and the block sizes."""

    def __init__(self, weights, biases, x, targets, lr, lr_scale, queries, query_y, activation,
                 loss):
        self.weights = [w.contiguous() for w in weights]
        self.biases = [b.contiguous() for b in biases]
        self.has_bias = len(self.biases) > 0
        self.lr_scale = [s.contiguous() for s in lr_scale]
        self.x, self.targets, self.lr = x.contiguous(), targets.contiguous(), lr.contiguous()
        self.queries = None if queries is None else queries.contiguous()
        self.query_y = None if query_y is None else query_y.contiguous()
        self.meta = self.query_y is not None
        self.form_b = self.meta and self.queries.dim() == 4
        # The queries the kernels read out at every step: unroll readout, or meta-loss form B.
        self.readout_queries = self.queries if (not self.meta or self.form_b) else None
        self.activation, self.loss = int(activation), int(loss)
        self.ce = self.loss == 1
        self.per_step = self.x.dim() == 4
        self.tasks, self.steps = self.lr.shape
        self.n = self.x.shape[-2]
        self.L = len(self.weights)
        self.widths = [self.weights[0].shape[-2]] + [w.shape[-1] for w in self.weights]
        self.m = self.queries.shape[-2] if self.queries is not None else 0
        self.dtype, self.device = self.weights[0].dtype, self.weights[0].device
        why = mlp_unsupported_reason(self.widths, self.n, self.m)
        if why is not None:
            raise RuntimeError(why)
        self.BD, self.BN, self.BM = _padded(self.widths, self.n, self.m)
        self.BF = 1024
        sizes = [a * b for a, b in zip(self.widths[:-1], self.widths[1:])]
        w_offs = [sum(sizes[:l]) for l in range(self.L)]
        b_offs = [sum(sizes) + sum(self.widths[1:l + 1]) for l in range(self.L)]
        self.table = [(self.widths[l], self.widths[l + 1], w_offs[l], b_offs[l])
                      for l in range(self.L)]
        self.P = sum(sizes) + (sum(self.widths[1:]) if self.has_bias else 0)
        self.layers = torch.tensor(self.table, dtype=torch.int32, device=self.device)
        self.precision = _launch.dot_precision(self.dtype)
        self.num_warps = _launch.num_warps(self.BD * self.BD, self.BN * self.BD)
        self.scale = (torch.cat([s.float().reshape(-1) for s in self.lr_scale]
                                + ([torch.ones(self.P - sum(sizes), device=self.device)]
                                   if self.has_bias else [])).contiguous()
                      if self.lr_scale else None)

    def pack(self, weights, biases) -> torch.Tensor:
        """[B, P] float32 θ from L tensors [B, d_l, d_{l+1}] and L (or 0) [B, d_{l+1}]."""
        B = self.tasks
        parts = [w.float().reshape(B, a * b) for w, (a, b, _, _) in zip(weights, self.table)]
        parts += ([b.float().reshape(B, d) for b, (_, d, _, _) in zip(biases, self.table)]
                  if self.has_bias else [])
        return torch.cat(parts, 1).contiguous()

    def unpack(self, theta: torch.Tensor):
        """(L weights [B, d_l, d_{l+1}], L or 0 biases [B, d_{l+1}]) views of a packed θ."""
        weights = [theta[:, w:w + a * b].reshape(-1, a, b) for a, b, w, _ in self.table]
        biases = [theta[:, o:o + b] for _, b, _, o in self.table] if self.has_bias else []
        return weights, biases

    def common(self):
        return dict(ACT=self.activation, LOSS_CE=self.ce, HAS_BIAS=self.has_bias,
                    HAS_LR_SCALE=self.scale is not None,
                    HAS_QUERIES=self.readout_queries is not None, BN=self.BN, BM=self.BM,
                    BD=self.BD, BF=self.BF, PRECISION=self.precision, num_warps=self.num_warps)

    def scratch(self, rows_block: int) -> torch.Tensor:
        return torch.empty(self.tasks * self.L * rows_block * self.BD, dtype=torch.float32,
                           device=self.device)

    def dummy(self, t):
        """Triton wants a tensor for every pointer; absent ones get one that is never read."""
        return self.layers if t is None else t

    def steps_of(self, t: torch.Tensor | None, t0: int, t1: int, per_step: bool = True):
        """Steps [t0, t1) of a per-step tensor ([B, T, …]), contiguous; others as they are."""
        if t is None or not per_step:
            return t
        return t[:, t0:t1].contiguous()

    def run_forward(self, theta, t0: int, t1: int, stride: int, readout_dtype):
        """Steps [t0, t1) from the packed θ_{t0} (updated in place to θ_{t1}). Returns (losses
        [B, t1−t0] float32, readout [B, t1−t0, m, d_L] or None, states [B, S, P] or None)."""
        B, T = self.tasks, t1 - t0
        S = -(-T // stride) if stride > 0 else 0
        losses = _launch.new_output((B, T), torch.float32, self.device)
        queries = self.steps_of(self.readout_queries, t0, t1)
        readout = (None if queries is None else
                   _launch.new_output((B, T, self.m, self.widths[-1]), readout_dtype, self.device))
        states = _launch.new_output((B, S, self.P), torch.float32, self.device) if S else None
        if B > 0 and T > 0:
            x = self.steps_of(self.x, t0, t1, self.per_step)
            y = self.steps_of(self.targets, t0, t1, self.per_step)
            _launch_mlp(
                fast_weight_mlp_fwd_kernel, (B,),
                theta, self.layers, x, y, self.lr[:, t0:t1].contiguous(), self.dummy(self.scale),
                self.dummy(queries), losses, self.dummy(readout), self.dummy(states),
                self.scratch(self.BN),
                x.stride(0), x.stride(1) if self.per_step else 0,
                y.stride(0), y.stride(1) if self.per_step else 0,
                T, self.L, self.n, self.m, self.widths[0], self.widths[-1], self.P,
                max(stride, 1), max(S, 1), STORE_STATES=S > 0, **self.common())
        return losses, readout, states

    def outer_loss(self, outputs, query_y):
        """Per-task outer loss [B] of the network's outputs (form A [B, m, d_L]; form B
        [B, T, m, d_L], summed over steps), in float32."""
        targets = query_y.float() if not self.ce else query_y
        per = _row_mean_loss(outputs.float(), targets, "ce" if self.ce else "mse")
        return per.sum(1) if per.dim() == 2 else per


def _outer_adjoint(u: _MLP, outputs: torch.Tensor, query_y: torch.Tensor,
                   c: torch.Tensor) -> torch.Tensor:
    """c·Ê = c·∂ℓ/∂outputs of the outer loss, ``outputs [B, (T,) m, d_L]`` float32: mse
    ``c (Z − Y)/m``, ce ``c (softmax(Z) − onehot(Y))/m``. Written out rather than taken from
    autograd, which the custom op's backward runs without."""
    rows = outputs.shape[-2]
    if u.ce:
        residual = torch.softmax(outputs, -1)
        residual.scatter_add_(-1, query_y.unsqueeze(-1),
                              torch.full(query_y.shape + (1,), -1.0, dtype=torch.float32,
                                         device=outputs.device))
    else:
        residual = outputs - query_y.float()
    return residual * (c / rows).view((-1,) + (1,) * (outputs.dim() - 1))


def _network_torch(u: _MLP, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The network at a packed θ on ``inputs [B, m, d_0]``, in PyTorch (meta-loss form A)."""
    weights, biases = u.unpack(theta)
    return mlp_apply(weights, biases if u.has_bias else None, inputs.float(),
                     ACTIVATIONS[u.activation])


def mlp_forward(weights, biases, x, targets, lr, lr_scale, queries, query_y, activation, loss,
                stride):
    """``[losses, out, states, *weights_T, *biases_T]``: the signature and conventions of
    metakernels/_C.pyi. The outer loss of meta-loss mode is computed in PyTorch from the
    kernels' float32 readout (form B) or θ_T (form A)."""
    u = _MLP(weights, biases, x, targets, lr, lr_scale, queries, query_y, activation, loss)
    theta = u.pack(u.weights, u.biases)
    losses, readout, states = u.run_forward(theta, 0, u.steps, int(stride),
                                            torch.float32 if u.meta else u.dtype)
    if not u.meta:
        out = readout if readout is not None else torch.empty(0, dtype=u.dtype, device=u.device)
    elif u.form_b:
        out = u.outer_loss(readout, u.query_y).to(u.dtype)
    else:
        with torch.no_grad():
            out = u.outer_loss(_network_torch(u, theta, u.queries), u.query_y).to(u.dtype)
    if states is None:
        states = torch.empty(0, dtype=torch.float32, device=u.device)
    weights_T, biases_T = u.unpack(theta)
    # Copies: the unpacked layers are views of one buffer, and a custom op's outputs may not
    # alias each other.
    return ([losses.to(u.dtype), out, states] + [w.to(u.dtype, copy=True) for w in weights_T]
            + [b.to(u.dtype, copy=True) for b in biases_T])


def mlp_backward(weights, biases, x, targets, lr, lr_scale, queries, query_y, states,
                 weights_final, biases_final, grad_weights_final, grad_biases_final, grad_out,
                 activation, loss, stride, first_order, wanted):
    """``[grad_x, grad_targets, grad_lr, grad_queries, grad_query_y, *grad_weights,
    *grad_biases, *grad_lr_scale]``: the signature and conventions of metakernels/_C.pyi.

    With ``stride`` k > 1 the steps run backwards in segments of k: each segment's θ_t are
    recomputed by the forward kernel from its stored start, then its backward runs. Meta-loss
    form A: Ê of the outer loss at a float32 θ_T recomputed from the last stored state
    (``weights_final`` is not read: a half-precision θ_T would lose digits), which the kernel
    backpropagates as the readout of the last step; form B: the readouts' adjoints c·Ê_t, from
    readouts the forward kernel recomputes segment by segment. No autograd: the custom op's
    backward runs without it."""
    if len(wanted) != 8:
        raise RuntimeError("metakernels internal error: mlp_backward takes 8 flags")
    u = _MLP(weights, biases, x, targets, lr, lr_scale, queries, query_y, activation, loss)
    B, T, L, dtype, device = u.tasks, u.steps, u.L, u.dtype, u.device
    f32 = torch.float32
    want_w, want_b, want_x, want_y, want_lr, want_scale, want_q, want_qy = (bool(w)
                                                                           for w in wanted)
    want_y = want_y and not u.ce
    want_b = want_b and u.has_bias
    want_scale = want_scale and u.scale is not None
    want_q = want_q and u.queries is not None
    want_qy = want_qy and u.meta and not u.ce
    first = bool(first_order)
    stride = int(stride)
    S = -(-T // stride) if stride > 0 else 0
    if B > 0 and (states.dim() != 3 or tuple(states.shape) != (B, S, u.P)):
        raise RuntimeError("metakernels internal error: the MLP backward needs the forward's "
                           f"states [B, {S}, {u.P}], got {tuple(states.shape)}")

    if B == 0:
        zero = lambda want, t: (torch.zeros(t.shape, dtype=dtype, device=device) if want  # noqa
                                else torch.empty(0, dtype=dtype, device=device))
        return ([zero(want_x, u.x), zero(want_y, u.targets), zero(want_lr, u.lr),
                 zero(want_q, u.queries), zero(want_qy, u.query_y)]
                + [zero(want_w, w) for w in u.weights]
                + ([zero(want_b, b) for b in u.biases] if u.has_bias
                   else [zero(False, u.lr) for _ in range(L)])
                + ([zero(True, s) for s in u.lr_scale] if want_scale
                   else [zero(False, u.lr) for _ in range(L)]))
    grad_theta = torch.zeros(B, u.P, dtype=f32, device=device)   # θ̂_T, then θ̂_t
    gw, gb = u.unpack(grad_theta)
    for l in range(L):
        if len(grad_weights_final) and grad_weights_final[l].numel():
            gw[l].copy_(grad_weights_final[l])
        if u.has_bias and len(grad_biases_final) and grad_biases_final[l].numel():
            gb[l].copy_(grad_biases_final[l])
    grad_lr = _launch.new_output((B, T), f32, device)
    grad_scale = torch.zeros(B, u.P, dtype=f32, device=device) if want_scale else None
    grad_x = grad_y = grad_q = grad_qy = None
    zeros = lambda t: torch.zeros(t.shape, dtype=f32, device=device)  # noqa: E731
    # 3-D x: the kernel adds Σ_t X̂_t into a zeroed buffer, segment after segment.
    if want_x:
        grad_x = zeros(u.x) if first or not u.per_step else _launch.new_output(u.x.shape, f32,
                                                                                 device)
    if want_y:
        grad_y = (zeros(u.targets) if first or not u.per_step
                  else _launch.new_output(u.targets.shape, f32, device))
    c = None
    if u.meta:
        c = (torch.zeros(B, dtype=f32, device=device) if grad_out is None
             else grad_out.to(f32).reshape(B))
    elif grad_out is not None and grad_out.numel() == 0:
        grad_out = None

    # Meta-loss form A: Ê of the outer loss at θ_T (recomputed in float32 from the last kept
    # state); the kernel takes it as the readout adjoint of the last step, queried by query_x.
    adjoint_a = None
    if u.meta and not u.form_b:
        theta_T = states[:, S - 1].clone()
        u.run_forward(theta_T, (S - 1) * stride, T, 0, f32)
        outputs = _network_torch(u, theta_T, u.queries)
        adjoint_a = _outer_adjoint(u, outputs, u.query_y, c).contiguous()
        if want_qy:
            grad_qy = -adjoint_a
    if want_q:
        grad_q = _launch.new_output(u.queries.shape, f32, device)
    if u.form_b and want_qy:
        grad_qy = _launch.new_output(u.query_y.shape, f32, device)

    segment = stride if stride > 1 else T
    for t0 in reversed(range(0, T, max(segment, 1))):
        t1 = min(t0 + segment, T)
        if stride == 1:
            seg_states = states
        else:
            _, _, seg_states = u.run_forward(states[:, t0 // stride].clone(), t0, t1, 1, f32)
        n_steps = t1 - t0
        # The readout the kernel differentiates: (queries, its adjoint, the first step that has
        # one, grad-queries buffer), the two tensors [B, n_steps, m, ·] or, form A, [B, m, ·]
        # read at the last step only.
        seg_queries = grad_readout = seg_q = None
        q_first = 0
        if u.form_b:
            _, readout, _ = u.run_forward(seg_states[:, 0].clone(), t0, t1, 0, f32)
            grad_readout = _outer_adjoint(u, readout, u.query_y[:, t0:t1], c).contiguous()
            if want_qy:
                grad_qy[:, t0:t1] = -grad_readout
        elif not u.meta and u.queries is not None:
            grad_readout = (torch.zeros(B, n_steps, u.m, u.widths[-1], dtype=f32, device=device)
                            if grad_out is None else grad_out[:, t0:t1].contiguous())
        elif u.meta and t1 == T:
            seg_queries, grad_readout, q_first = u.queries, adjoint_a, n_steps - 1
        if grad_readout is not None and seg_queries is None:
            seg_queries = u.steps_of(u.queries, t0, t1)
        if want_q and seg_queries is not None:
            seg_q = (grad_q if seg_queries.dim() == 3 else
                     _launch.new_output((B, n_steps, u.m, u.widths[0]), f32, device))
        step_stride = lambda t: t.stride(1) if t.dim() == 4 else 0  # noqa: E731
        seg_lr = _launch.new_output((B, n_steps), f32, device)
        seg_x = (grad_x if not u.per_step or first or grad_x is None
                 else _launch.new_output((B, n_steps) + tuple(u.x.shape[2:]), f32, device))
        seg_y = (grad_y if not u.per_step or first or grad_y is None
                 else _launch.new_output((B, n_steps) + tuple(u.targets.shape[2:]), f32, device))
        x_seg = u.steps_of(u.x, t0, t1, u.per_step)
        y_seg = u.steps_of(u.targets, t0, t1, u.per_step)
        _launch_mlp(
            fast_weight_mlp_bwd_kernel, (B,),
            seg_states.contiguous(), u.layers, x_seg, y_seg, u.lr[:, t0:t1].contiguous(),
            u.dummy(u.scale), u.dummy(seg_queries),
            u.dummy(grad_readout), grad_theta, seg_lr, u.dummy(grad_scale), u.dummy(seg_x),
            u.dummy(seg_y), u.dummy(seg_q),
            torch.empty(B * u.P, dtype=f32, device=device),
            torch.empty(B * u.P, dtype=f32, device=device),
            u.scratch(u.BN), u.scratch(u.BN), u.scratch(u.BM),
            x_seg.stride(0), x_seg.stride(1) if u.per_step else 0,
            y_seg.stride(0), y_seg.stride(1) if u.per_step else 0,
            seg_queries.stride(0) if seg_queries is not None else 0,
            step_stride(seg_queries) if seg_queries is not None else 0,
            grad_readout.stride(0) if grad_readout is not None else 0,
            step_stride(grad_readout) if grad_readout is not None else 0, q_first,
            n_steps, L, u.n, u.m, u.widths[0], u.widths[-1], u.P,
            X_PER_STEP=u.per_step, FIRST_ORDER=first, WANT_X=want_x and not first,
            WANT_Y=want_y and not first, WANT_SCALE=want_scale,
            WANT_QUERIES=seg_q is not None, **dict(u.common(),
                                                   HAS_QUERIES=seg_queries is not None))
        grad_lr[:, t0:t1] = seg_lr
        if u.per_step and not first:
            if want_x:
                grad_x[:, t0:t1] = seg_x
            if want_y:
                grad_y[:, t0:t1] = seg_y
        if seg_q is not None and seg_q is not grad_q:
            grad_q[:, t0:t1] = seg_q

    empty = lambda: torch.empty(0, dtype=dtype, device=device)  # noqa: E731
    cast = lambda want, t: t.to(dtype, copy=True) if want else empty()  # noqa: E731
    gw, gb = u.unpack(grad_theta)
    out = [cast(want_x, grad_x), cast(want_y, grad_y), cast(want_lr, grad_lr),
           cast(want_q, grad_q), cast(want_qy, grad_qy)]
    out += [cast(want_w, g) for g in gw]
    out += [cast(want_b, g) for g in gb] if u.has_bias else [empty() for _ in range(L)]
    if want_scale:
        out += [g.sum(0).to(dtype) for g in u.unpack(grad_scale)[0]]
    else:
        out += [empty() for _ in range(L)]
    return out
