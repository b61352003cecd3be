"""Triton kernel of ``linear_hvp`` (docs/ops/linear_hvp.md): ``Hv = Xᵀ H_E (X V + 1 v_bᵀ)`` per
task.

Grid ``(B, NV)`` as in :mod:`metakernels.triton.fast_weight_unroll`: mse tiles d_out (H_E = I/n
keeps columns apart), ce owns whole rows (the softmax Jacobian couples them). Same limits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from metakernels.triton import _launch
from metakernels.triton.fast_weight_unroll import _ce_hessian, _column_tile, _softmax_rows


@triton.jit
def linear_hvp_fwd_kernel(
    p_weight, p_bias, p_x, p_v, p_v_bias, p_hv_weight, p_hv_bias,
    s_w_b, s_b_b, s_vb_b, n, d_in, d_out,
    LOSS_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr,
    WITH_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n, o_k, o_v, m_n, m_k, m_v, m_nv, m_kv, o_kv = _column_tile(i_v, n, d_in, d_out, BN, BK, BV)

    b_x = tl.load(p_x + i_b * n * d_in + o_n[:, None] * d_in + o_k[None, :],
                  mask=m_n[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_vw = tl.load(p_v + i_b * d_in * d_out + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    b_u = tl.dot(b_x, b_vw, input_precision=PRECISION)                    # X V + 1 v_bᵀ
    if HAS_V_BIAS:
        b_u += tl.load(p_v_bias + i_b * s_vb_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    if LOSS_CE:
        b_w = tl.load(p_weight + i_b * s_w_b + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_z = tl.dot(b_x, b_w, input_precision=PRECISION)
        if HAS_BIAS:
            b_z += tl.load(p_bias + i_b * s_b_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        b_p, _ = _softmax_rows(b_z, m_n, m_v)
        b_h = _ce_hessian(tl.where(m_nv, b_p, 0.0), b_u, n)
    else:
        b_h = b_u / n
    b_h = tl.where(m_nv, b_h, 0.0)
    b_hv = tl.dot(tl.trans(b_x), b_h, input_precision=PRECISION)
    tl.store(p_hv_weight + i_b * d_in * d_out + o_kv, b_hv.to(p_hv_weight.dtype.element_ty),
             mask=m_kv)
    if WITH_BIAS:
        tl.store(p_hv_bias + i_b * d_out + o_v, tl.sum(b_h, 0).to(p_hv_bias.dtype.element_ty),
                 mask=m_v)


def linear_hvp(weight, x, v, bias, v_bias, loss, with_bias):
    """[Hv_weight [B, d_in, d_out], Hv_bias [B, d_out] or [0]] (metakernels/_C.pyi)."""
    weight, x, v = weight.contiguous(), x.contiguous(), v.contiguous()
    bias = None if bias is None else bias.contiguous()
    v_bias = None if v_bias is None else v_bias.contiguous()
    tasks, n, d_in = x.shape
    d_out = weight.shape[-1]
    ce = loss == 1
    dtype, device = weight.dtype, weight.device
    hv_weight = _launch.new_output((tasks, d_in, d_out), dtype, device)
    hv_bias = (_launch.new_output((tasks, d_out), dtype, device) if with_bias
               else _launch.no_output(weight))
    BN, BK = _launch.block(n), _launch.block(d_in)
    BV = _launch.column_block(d_in, d_out, whole_rows=ce)
    _launch.check_fits(weight=(BK, BV), x=(BN, BK), residual=(BN, BV))
    if tasks > 0:
        _launch.launch(
            linear_hvp_fwd_kernel, (tasks, triton.cdiv(d_out, BV)),
            weight, weight if bias is None else bias, x, v, weight if v_bias is None else v_bias,
            hv_weight, hv_bias if with_bias else hv_weight,
            _launch.task_stride(weight, 3), 0 if bias is None else _launch.task_stride(bias, 2),
            0 if v_bias is None else _launch.task_stride(v_bias, 2), n, d_in, d_out,
            LOSS_CE=ce, HAS_BIAS=bias is not None, HAS_V_BIAS=v_bias is not None,
            WITH_BIAS=bool(with_bias), BN=BN, BK=BK, BV=BV,
            PRECISION=_launch.dot_precision(dtype),
            num_warps=_launch.num_warps(BK * BV, BN * BK, BN * BV))
    return [hv_weight, hv_bias]
