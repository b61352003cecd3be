"""``delta_rule``: the delta rule (DeltaNet) in flash-linear-attention's layout, with heads, an
initial and a final state and packed variable-length sequences (docs/ops/delta_rule.md).

It is :func:`fast_weight_unroll` with one support row per step: every (sequence, head) pair is a
task, ``W = S`` ``[K, V]``, ``x_t = k_t``, ``y_t = v_t``, ``lr_t = β_t``, and the readout of step t
with ``queries_t = scale · q_t`` is ``o_t``. So it runs on that op's backends and paths (on the
cpu the chunked path where it is faster), and its backward is that op's exact backward.

Packed sequences (``cu_seqlens``) are padded to the longest one with steps that change nothing
(zero key, value and β: the update ``β k (v − Sᵀk)ᵀ`` is zero, and the adjoints pass through such
a step unchanged), run as one batch of tasks, and unpacked; padding costs
``N·max_len`` steps instead of ``T``. Reading the lengths is one device-to-host copy of
``cu_seqlens``, none where the caller passes their host copy as ``cu_seqlens_cpu`` (as fla's
op takes it). Under ``torch.compile``, ``make_fx`` or a functorch transform, the packed form
runs behind the custom ops ``metakernels::delta_rule_packed_fwd`` / ``_bwd``, whose output
shapes follow from the inputs' alone (the ragged layout stays inside them); their backward
recomputes the forward with autograd, about one more forward than the eager path.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from metakernels.ops import _autocast, _checks
from metakernels.ops.fast_weight_unroll import _plain_eager, fast_weight_unroll

HALF_DTYPES = (torch.bfloat16, torch.float16)


@_autocast.autocast_op(keep_outputs=(1,))
def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: Tensor | None = None, cu_seqlens_cpu: Tensor | None = None,
               backend: str = "auto") -> tuple[Tensor, Optional[Tensor]]:
    r"""The delta rule, token by token, for every sequence and head at once.

    Per sequence and head, from ``S_0 = initial_state`` (zeros when None)::

        S_t = S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ k_t)ᵀ        o_t = scale · S_tᵀ q_t

    (``o_t`` is read after the update with token t), with exact gradients in q, k, v, β and
    ``initial_state`` (the last is the meta-gradient of the init).

    Args:
        q: ``[B, T, H, K]`` queries.
        k: ``[B, T, H, K]`` keys (the step is stable for ``β_t ‖k_t‖² < 2``; fla's users
            L2-normalise them).
        v: ``[B, T, H, V]`` values.
        beta: ``[B, T, H]`` the step sizes β_t.
        scale: the readout's scale; ``K ** -0.5`` when None.
        initial_state: None or ``[N, H, K, V]``, one state per sequence (N = B, or the number
            of packed sequences).
        output_final_state: return the final state ``[N, H, K, V]`` (else None in its place).
        cu_seqlens: None, or int32/int64 ``[N + 1]`` cumulative lengths of N sequences packed
            along T, with B = 1: ``0 = cu[0] ≤ cu[1] ≤ … ≤ cu[N] = T``; each runs from its own
            initial state.
        cu_seqlens_cpu: None, or cu_seqlens's copy on the CPU: its values are read there, so
            that a call on a GPU makes no device-to-host copy (fla's argument of that name).
        backend: as in :func:`fast_weight_unroll` (``"auto"``, ``"reference"``, ``"cpu"``,
            ``"triton"``, ``"cuda"``).

    Returns:
        ``(o [B, T, H, V], final_state [N, H, K, V] or None)``. o has q's dtype; the final state
        has it too, except for bfloat16/float16 inputs, where it is float32 (as fla's).
        With half-type inputs, ``initial_state`` may be float32 or q's dtype; it enters the
        kernels in q's dtype (their state is float32 across the steps).
    """
    scale, bounds = _check(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
                           cu_seqlens_cpu)
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    state = None if initial_state is None else initial_state.to(q.dtype)
    if cu_seqlens is None:
        if length == 0:
            o = v.clone()  # [B, 0, H, V], on the autograd graph like every other output
            final = state.clone() if state is not None else q.new_zeros(batch, heads, d_k, d_v)
        else:
            o, final = _unroll(q, k, v, beta, state, scale, backend)
    elif _plain_eager(q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu):
        o, final = _packed(q, k, v, beta, state, cu_seqlens, bounds, scale, backend)
    else:
        o, final = torch.ops.metakernels.delta_rule_packed_fwd(
            q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu, scale, backend)
    if not output_final_state:
        return o, None
    return o, (final.float() if q.dtype in HALF_DTYPES else final)


def _unroll(q, k, v, beta, state, scale, backend) -> tuple[Tensor, Tensor]:
    """q, k ``[N, L, H, K]``, v ``[N, L, H, V]``, β ``[N, L, H]``, state ``[N, H, K, V]`` or None
    -> (o ``[N, L, H, V]``, final ``[N, H, K, V]``), by fast_weight_unroll with n = 1 and one
    task per (sequence, head)."""
    sequences, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    tasks = sequences * heads

    def per_task(t: Tensor) -> Tensor:  # [N, L, H, D] -> [N·H, L, 1, D]
        return t.transpose(1, 2).reshape(tasks, length, 1, t.shape[-1])

    weight = q.new_zeros(d_k, d_v) if state is None else state.reshape(tasks, d_k, d_v)
    out = fast_weight_unroll(weight, per_task(k), per_task(v),
                             beta.transpose(1, 2).reshape(tasks, length),
                             queries=per_task(q * scale), backend=backend)
    o = out.readout.reshape(sequences, heads, length, d_v).transpose(1, 2).contiguous()
    return o, out.weight.reshape(sequences, heads, d_k, d_v)


def _packed(q, k, v, beta, state, cu_seqlens, bounds: list[int], scale,
            backend) -> tuple[Tensor, Tensor]:
    """The packed form: q, k ``[1, T, H, K]`` … with ``cu_seqlens`` (and its values as a list)
    -> (o ``[1, T, H, V]``, final ``[N, H, K, V]``), every sequence padded to the longest."""
    length = q.shape[1]
    gather, scatter, longest = _packing(cu_seqlens, bounds)

    def pad(t: Tensor) -> Tensor:  # [1, T, H, ...] -> [N, longest, H, ...], zeros past each end
        rows = torch.cat([t[0], t.new_zeros((1,) + t.shape[2:])])
        return rows.index_select(0, gather).reshape((-1, longest) + t.shape[2:])

    o, final = _unroll(pad(q), pad(k), pad(v), pad(beta), state, scale, backend)
    o = o.reshape((-1,) + o.shape[2:]).index_select(0, scatter)
    return o.reshape((1, length) + o.shape[1:]), final


def _packing(cu_seqlens: Tensor, bounds: list[int]) -> tuple[Tensor, Tensor, int]:
    """For sequences ``[cu[i], cu[i+1])`` of a packed T: the packed row each padded position
    reads (T, a zero row, past a sequence's end), ``[N·longest]``; the padded position of each
    packed row, ``[T]``; and the longest length (at least 1). Built on cu_seqlens's device from
    the host's values of the lengths only (no copy to the device and back)."""
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    longest = max([1] + [stop - start for start, stop in zip(bounds[:-1], bounds[1:])])
    steps = torch.arange(longest, device=cu.device)
    gather = torch.where(steps < lengths[:, None], starts[:, None] + steps, bounds[-1])
    tokens = torch.arange(bounds[-1], device=cu.device)
    sequence = torch.searchsorted(cu[1:], tokens, right=True)  # empty sequences are skipped
    return gather.flatten(), sequence * longest + tokens - starts[sequence], longest


def _check(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
           cu_seqlens_cpu=None):
    """Checks the arguments (docs/ops/delta_rule.md); returns the scale as a float and, with
    cu_seqlens in eager mode, its values as a list (None otherwise)."""
    for name, value in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _checks.require_tensor(name, value)
    _checks.require_tensor("initial_state", initial_state, optional=True)
    _checks.require_tensor("cu_seqlens", cu_seqlens, optional=True)
    _checks.require_tensor("cu_seqlens_cpu", cu_seqlens_cpu, optional=True)
    _checks.check_flag("output_final_state", output_final_state)
    if q.dim() != 4:
        raise ValueError(f"q has shape {_checks.shape_str(q.shape)}, expected [B, T, H, K]")
    batch, length, heads, d_k = q.shape
    if d_k < 1:
        raise ValueError(f"q has shape {_checks.shape_str(q.shape)}: K = 0, expected at least 1")
    _checks.check_shape("k", k, tuple(q.shape))
    if v.dim() != 4 or tuple(v.shape[:3]) != (batch, length, heads) or v.shape[3] < 1:
        raise ValueError(f"v has shape {_checks.shape_str(v.shape)}, expected [B, T, H, V] = "
                         f"[{batch}, {length}, {heads}, V] with V ≥ 1")
    d_v = v.shape[3]
    _checks.check_shape("beta", beta, (batch, length, heads))

    _checks.check_float_dtype(q, anchor="q")
    for name, tensor in (("k", k), ("v", v), ("beta", beta)):
        _checks.check_same_dtype(name, tensor, q.dtype, anchor="q")
    for name, tensor in (("k", k), ("v", v), ("beta", beta), ("initial_state", initial_state),
                         ("cu_seqlens", cu_seqlens)):
        _checks.check_device(name, tensor, q.device, anchor="q")

    if scale is None:
        scale = d_k ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    sequences = batch
    bounds = None
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens has dtype {_checks.dtype_name(cu_seqlens.dtype)}, "
                             "expected int32 or int64")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens has shape {_checks.shape_str(cu_seqlens.shape)}, "
                             "expected [N + 1] with N ≥ 1 sequences")
        if batch != 1:
            raise ValueError(f"q has shape {_checks.shape_str(q.shape)} with B = {batch}, but "
                             "cu_seqlens packs the sequences along T of a batch of one: flatten "
                             "them to [1, T_total, H, K]")
        sequences = cu_seqlens.shape[0] - 1
        if cu_seqlens_cpu is not None and (
                cu_seqlens_cpu.device.type != "cpu" or cu_seqlens_cpu.shape != cu_seqlens.shape
                or cu_seqlens_cpu.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"cu_seqlens_cpu is a {_checks.dtype_name(cu_seqlens_cpu.dtype)} "
                             f"tensor of shape {_checks.shape_str(cu_seqlens_cpu.shape)} on "
                             f"{cu_seqlens_cpu.device}, expected cu_seqlens's values on the cpu: "
                             f"int32 or int64, shape {_checks.shape_str(cu_seqlens.shape)}")
        if not torch.compiler.is_compiling():
            bounds = host_bounds(cu_seqlens, cu_seqlens_cpu)
            check_bounds(bounds, length)
    elif cu_seqlens_cpu is not None:
        raise ValueError("cu_seqlens_cpu was given without cu_seqlens; it is cu_seqlens's copy "
                         "on the cpu")

    if initial_state is not None:
        _checks.check_shape("initial_state", initial_state, (sequences, heads, d_k, d_v))
        allowed = (q.dtype, torch.float32) if q.dtype in HALF_DTYPES else (q.dtype,)
        if initial_state.dtype not in allowed:
            names = " or ".join(_checks.dtype_name(d) for d in allowed)
            raise ValueError(f"initial_state has dtype {_checks.dtype_name(initial_state.dtype)}, "
                             f"expected {names} (q has {_checks.dtype_name(q.dtype)})")
    return float(scale), bounds


def host_bounds(cu_seqlens: Tensor, cu_seqlens_cpu: Tensor | None) -> list[int]:
    """cu_seqlens's values: from its host copy where given, else the one device-to-host copy of
    a packed call."""
    return (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).tolist()


def check_bounds(bounds: list[int], length: int) -> None:
    """cu_seqlens's values: from 0 to T, never decreasing."""
    if bounds[0] != 0 or bounds[-1] != length or any(
            a > b for a, b in zip(bounds[:-1], bounds[1:])):
        shown = bounds if len(bounds) <= 12 else bounds[:5] + ["..."] + bounds[-5:]
        raise ValueError(f"cu_seqlens holds {shown}, expected non-decreasing values from 0 to "
                         f"T = {length} (q's length)")


# --- the packed form behind custom ops (torch.compile, make_fx, functorch) -----------------------

@torch.library.custom_op("metakernels::delta_rule_packed_fwd", mutates_args=())
def _packed_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Optional[Tensor],
                cu_seqlens: Tensor, cu_seqlens_cpu: Optional[Tensor], scale: float,
                backend: str) -> tuple[Tensor, Tensor]:
    """(o ``[1, T, H, V]``, final state ``[N, H, K, V]``) of the packed sequences."""
    bounds = host_bounds(cu_seqlens, cu_seqlens_cpu)
    check_bounds(bounds, q.shape[1])
    with torch.no_grad():
        return _packed(q, k, v, beta, state, cu_seqlens, bounds, scale, backend)


@_packed_fwd.register_fake
def _packed_fwd_fake(q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu, scale, backend):
    heads, d_k, d_v = q.shape[2], q.shape[3], v.shape[3]
    return (q.new_empty(q.shape[:3] + (d_v,)),
            q.new_empty(cu_seqlens.shape[0] - 1, heads, d_k, d_v))


def _packed_setup_context(ctx, inputs, output):
    q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu, scale, backend = inputs
    ctx.save_for_backward(q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu)
    ctx.scale, ctx.backend = scale, backend
    ctx.set_materialize_grads(False)


def _packed_backward(ctx, grad_o, grad_final):
    q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu = ctx.saved_tensors
    wanted = [bool(w) for w in ctx.needs_input_grad[:5]]
    grads = torch.ops.metakernels.delta_rule_packed_bwd(
        q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu, grad_o, grad_final, ctx.scale,
        ctx.backend, wanted)
    return tuple(g if want else None for g, want in zip(grads, wanted)) + (None,) * 4


_packed_fwd.register_autograd(_packed_backward, setup_context=_packed_setup_context)


@torch.library.custom_op("metakernels::delta_rule_packed_bwd", mutates_args=())
def _packed_bwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Optional[Tensor],
                cu_seqlens: Tensor, cu_seqlens_cpu: Optional[Tensor], grad_o: Optional[Tensor],
                grad_final: Optional[Tensor],
                scale: float, backend: str,
                wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (q, k, v, beta, state), each an empty tensor where not wanted: the
    forward again, with autograd, then its backward."""
    bounds = host_bounds(cu_seqlens, cu_seqlens_cpu)
    heads, d_k, d_v = q.shape[2], q.shape[3], v.shape[3]
    start = state if state is not None else q.new_zeros(len(bounds) - 1, heads, d_k, d_v)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, beta, start)]
    with _autograd_inside_custom_op():
        o, final = _packed(*leaves, cu_seqlens, bounds, scale, backend)
        pairs = [(out, grad) for out, grad in ((o, grad_o), (final, grad_final))
                 if grad is not None]
        grads = torch.autograd.grad([out for out, _ in pairs], leaves,
                                    [grad for _, grad in pairs], allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None and want else g if want else q.new_empty(0)
                 for t, g, want in zip(leaves, grads, wanted))


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """Grad mode with autograd dispatch on, inside a custom op's body. torch.library runs a body
    below autograd (its dispatch keys excluded, and grad mode off in a backward), so recording
    a graph there needs both back; torch.func.vjp is no way round it, as it refuses the custom
    ops of fast_weight_unroll that the recomputation calls. The autocast keys stay excluded."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


@_packed_bwd.register_fake
def _packed_bwd_fake(q, k, v, beta, state, cu_seqlens, cu_seqlens_cpu, grad_o, grad_final,
                     scale, backend, wanted):
    return tuple(t.new_empty(t.shape) if want and t is not None else q.new_empty(0)
                 for t, want in zip((q, k, v, beta, state), wanted))


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "metakernels: the backward of delta_rule with cu_seqlens under torch.compile or a "
        "transform cannot be differentiated again; use backend='reference' in eager mode for "
        "higher-order derivatives.")


_packed_bwd.register_autograd(_no_double_backward)
