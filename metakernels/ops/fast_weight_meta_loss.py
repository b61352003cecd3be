"""``fast_weight_meta_loss``: the unroll and the outer (query) loss in one op
(docs/ops/fast_weight_meta_loss.md).

The public function checks the contract once (the unroll's checks, plus the query set's), picks a
backend and returns the meta-loss. On the ``cpu`` backend the whole meta-step is one custom op
(``metakernels::fast_weight_meta_loss_fwd`` / ``_bwd``) whose forward runs the unroll kernels and
the query loss in C++ in one pass over tasks, and whose backward runs the query loss's gradient and
the unroll backward in one pass: no readout, logits or W_T adjoint goes through PyTorch. A plain
eager call skips the custom ops' Python dispatch (the eager fast path of
:mod:`metakernels.ops.fast_weight_unroll`). Checkpointed (``_ckpt_``) ops run the same kernels
segment by segment, the readout loss of each segment computed with it. The ``triton`` and
``cuda`` backends compose :func:`fast_weight_unroll` with the loss in PyTorch
(:func:`metakernels.reference.meta_loss.query_loss`): the same answer, without the fusion.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from metakernels import reference
from metakernels.ops import _autocast, _backends, _checks
from metakernels.ops import fast_weight_unroll as _unroll
from metakernels.reference.meta_loss import REDUCTIONS, query_loss, reduce_tasks

LOSS_CODES = _unroll.LOSS_CODES
# The gradients the backward op can return, in its order.
GRAD_INPUTS = ("weight", "x", "y", "lr", "bias", "lr_scale", "bias_lr_scale", "query_x",
               "query_y")


@_autocast.autocast_op
def fast_weight_meta_loss(weight: Tensor, x: Tensor, y: Tensor, lr, query_x: Tensor,
                          query_y: Tensor, *, steps: int | None = None, loss: str = "mse",
                          bias: Tensor | None = None, lr_scale: Tensor | None = None,
                          bias_lr_scale: Tensor | None = None, first_order: bool = False,
                          reduction: str = "mean", checkpoint: bool | None = None,
                          backend: str = "auto") -> Tensor:
    r"""The meta-loss of T inner steps for B tasks: :func:`fast_weight_unroll` and the outer
    (query) loss in one op, with the exact second-order meta-gradient as its backward.

    Per task, the inner loop is :func:`fast_weight_unroll`'s; the outer loss uses the same loss
    kind, the mean over the m query rows (mse ``1/(2m) Σ‖z − y‖²``, ce ``1/m Σ −log softmax``)::

        form A, query_x [B, m, d_in]:     L = ℓ(Q W_T + 1 b_Tᵀ, Y_q)              (MAML's meta-loss)
        form B, query_x [B, T, m, d_in]:  L = Σ_t ℓ(Q_t W_{t+1} + 1 b_{t+1}ᵀ, Y_{q,t})  (TTT, delta rule)

    Args:
        weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale, first_order: as in
            :func:`fast_weight_unroll`.
        query_x: ``[B, m, d_in]`` (form A: the loss of the adapted model) or ``[B, T, m, d_in]``
            (form B: the readout loss after every step, summed; the readout is never returned);
            differentiable.
        query_y: mse: float targets ``[B, m, d_out]`` / ``[B, T, m, d_out]`` (differentiable);
            ce: integer labels ``[B, m]`` / ``[B, T, m]`` in ``[0, d_out)``.
        reduction: ``"mean"`` over tasks (default), ``"sum"``, or ``"none"`` (``[B]``).
        checkpoint: as in :func:`fast_weight_unroll` (segments of ``⌈√T⌉`` steps, recomputed in
            the backward); on ``cpu`` each segment's readout loss is computed with it, so no
            readout of more than one segment ever exists.
        backend: ``"auto"``, ``"reference"`` (autograd through the reference unroll and the
            loss), ``"cpu"`` (fused: the loss and its gradient in C++ beside the unroll kernels,
            one op each way), ``"triton"`` or ``"cuda"`` (the fused unroll of that backend
            composed with the loss in PyTorch: not fused in this release).

    Returns:
        The meta-loss: ``[]`` for mean and sum, ``[B]`` for none, in weight's dtype.

    Memory (cpu): what :func:`fast_weight_unroll` keeps (E_t, and W_t of every step where x's
    gradient is wanted in second order, or query_x's in form B), W_T, and the query residual
    (``[B, m, d_out]``, form B ``[B, T, m, d_out]``: the readout's size, turned into its
    gradient in place). :func:`meta_loss_path` says which algorithm runs.
    """
    plan = _plan(weight, x, y, lr, query_x, query_y, steps, loss, bias, lr_scale, bias_lr_scale,
                 first_order, reduction, backend, checkpoint)
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, query_x, query_y = plan.args
    if plan.backend == "reference" and loss == "ce":
        _checks.check_label_range("y", y, weight.shape[-1])
    if (plan.backend == "reference" or not plan.fused) and loss == "ce":
        # The composed path's unroll checks y in its own body.
        _checks.check_label_range("query_y", query_y, weight.shape[-1])
    if plan.backend == "reference":
        return reference.fast_weight_meta_loss(
            weight, x, y, lr, query_x, query_y, steps=steps, loss=loss, bias=bias,
            lr_scale=lr_scale, bias_lr_scale=bias_lr_scale, first_order=first_order,
            reduction=reduction)
    if not plan.fused:
        return _composed(plan, loss, first_order, reduction)
    if plan.segment:
        return torch.ops.metakernels.fast_weight_meta_loss_ckpt_fwd(
            weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, LOSS_CODES[loss],
            first_order, plan.segment, REDUCTIONS.index(reduction), plan.backend)[0]
    args = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, LOSS_CODES[loss],
            first_order, plan.store_states, plan.keep_weight, plan.grad_bias_lr_scale,
            REDUCTIONS.index(reduction), plan.backend)
    if _unroll._plain_eager(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y):
        return _EagerMetaLoss.apply(*args)[0]
    return torch.ops.metakernels.fast_weight_meta_loss_fwd(*args)[0]


class _Plan(NamedTuple):
    args: tuple         # the checked, normalised arguments
    backend: str        # the backend that runs
    store_states: bool  # whether the backward needs W_t of every step
    keep_weight: bool   # whether the backward needs W_T (query_x's gradient)
    grad_bias_lr_scale: bool  # whether bias_lr_scale's gradient is wanted (the backward loops)
    segment: int        # checkpoint segment length, 0 without checkpointing
    fused: bool         # whether the fused meta-loss op runs (else unroll + loss in torch)


# The compiled backends whose kernel module has the fused meta-loss (meta_loss_forward/_backward).
FUSED_BACKENDS = ("cpu",)


def _plan(weight, x, y, lr, query_x, query_y, steps, loss, bias, lr_scale, bias_lr_scale,
          first_order, reduction, backend, checkpoint) -> _Plan:
    """Checks the arguments and decides how the call runs (from shapes and flags only)."""
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, one of {REDUCTIONS}, got "
                        f"{type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _checks.require_tensor("query_x", query_x)
    _checks.require_tensor("query_y", query_y)
    for name, value in (("weight", weight), ("x", x)):
        _checks.require_tensor(name, value)
    if query_x.dim() == 4 and x.dim() == 3 and steps is None:
        raise ValueError(f"steps is missing: x has shape {_checks.shape_str(x.shape)} (the same "
                         f"support set every step) and query_x has shape "
                         f"{_checks.shape_str(query_x.shape)} [B, T, m, d_in] (a readout loss "
                         "after every step); pass steps=T")
    form_b = query_x.dim() == 4
    _checked_query_x(query_x, x, _checks.check_steps("x", x, steps))
    # The unroll's own checks and plan; form B's query set is the unroll's readout (queries).
    unroll_plan = _unroll._plan(weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale,
                                query_x if form_b else None, first_order, backend, checkpoint)
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, _ = unroll_plan.args
    query_y = _checked_query_y(query_y, query_x, weight, loss)
    for name, tensor in (("query_x", query_x), ("query_y", query_y)):
        if name == "query_x" or loss == "mse":
            _checks.check_same_dtype(name, tensor, weight.dtype)
        _checks.check_device(name, tensor, weight.device)
    fused = unroll_plan.backend in FUSED_BACKENDS
    grad = torch.is_grad_enabled()
    grad_blr = grad and bias_lr_scale is not None and bias_lr_scale.requires_grad
    return _Plan((weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, query_x, query_y),
                 unroll_plan.backend, unroll_plan.store_states, grad and query_x.requires_grad,
                 grad_blr, unroll_plan.segment, fused)


def _checked_query_x(query_x: Tensor, x: Tensor, steps: int) -> None:
    """query_x must be [B, m, d_in] or [B, T, m, d_in] with B, T, d_in those of x, and m ≥ 1."""
    tasks, d_in = x.shape[0], x.shape[-1]
    expected = f"[B, m, d_in] = [{tasks}, m, {d_in}] or [B, T, m, d_in] = [{tasks}, {steps}, m, {d_in}]"
    if query_x.dim() not in (3, 4):
        raise ValueError(f"query_x has shape {_checks.shape_str(query_x.shape)}, expected {expected}")
    lead = (tasks,) if query_x.dim() == 3 else (tasks, steps)
    if tuple(query_x.shape[:-2]) != lead or query_x.shape[-1] != d_in:
        raise ValueError(f"query_x has shape {_checks.shape_str(query_x.shape)}, expected {expected}")
    if query_x.shape[-2] < 1:
        raise ValueError(f"query_x has shape {_checks.shape_str(query_x.shape)}: m = 0 query rows, "
                         "expected at least 1")


def _checked_query_y(query_y: Tensor, query_x: Tensor, weight: Tensor, loss: str) -> Tensor:
    lead = tuple(query_x.shape[:-1])
    d_out = weight.shape[-1]
    if loss == "mse":
        if not query_y.dtype.is_floating_point:
            raise ValueError(f"query_y has dtype {str(query_y.dtype).replace('torch.', '')}; "
                             "loss='mse' takes float targets (for class labels use loss='ce')")
        _checks.check_shape("query_y", query_y, lead + (d_out,))
        return query_y
    _checks.check_shape("query_y", query_y, lead)
    return _checks.check_labels("query_y", query_y, d_out)


def meta_loss_path(weight: Tensor, x: Tensor, y: Tensor, lr, query_x: Tensor, query_y: Tensor, *,
                   steps: int | None = None, loss: str = "mse", bias: Tensor | None = None,
                   lr_scale: Tensor | None = None, bias_lr_scale: Tensor | None = None,
                   first_order: bool = False, reduction: str = "mean",
                   checkpoint: bool | None = None, backend: str = "auto") -> str:
    """Which algorithm :func:`fast_weight_meta_loss` runs for these arguments (in the current
    grad mode): ``"reference"``; ``"fused:<unroll>"`` (the fused op; ``<unroll>`` is ``gram``,
    ``steps`` or ``steps/gram`` as :func:`unroll_path`); or ``"composed:<unroll_path>"`` (the
    backend's unroll, then the loss in PyTorch)."""
    plan = _plan(weight, x, y, lr, query_x, query_y, steps, loss, bias, lr_scale, bias_lr_scale,
                 first_order, reduction, backend, checkpoint)
    if plan.backend == "reference":
        return "reference"
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, query_x, query_y = plan.args
    if plan.fused:
        # Checkpointed segments run the kernels without storing W_t in the forward.
        return "fused:" + _backends.kernels(plan.backend).meta_loss_path(
            weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, LOSS_CODES[loss],
            plan.store_states and not plan.segment, plan.keep_weight or bool(plan.segment),
            plan.grad_bias_lr_scale) + (
                f" + checkpoint({plan.segment})" if plan.segment else "")
    return "composed:" + _unroll.unroll_path(
        weight, x, y, lr, steps=steps if x.dim() == 3 else None, loss=loss, bias=bias,
        lr_scale=lr_scale, bias_lr_scale=bias_lr_scale,
        queries=query_x if query_x.dim() == 4 else None, first_order=first_order,
        backend=plan.backend, checkpoint=bool(plan.segment))


def _composed(plan: _Plan, loss: str, first_order: bool, reduction: str) -> Tensor:
    """The backend's unroll, then the loss in PyTorch (triton and cuda)."""
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, query_x, query_y = plan.args
    form_b = query_x.dim() == 4
    out = _unroll.fast_weight_unroll(
        weight, x, y, lr, steps=steps if x.dim() == 3 else None, loss=loss, bias=bias,
        lr_scale=lr_scale, bias_lr_scale=bias_lr_scale, queries=query_x if form_b else None,
        first_order=first_order, backend=plan.backend, checkpoint=bool(plan.segment))
    return query_loss(out.weight, out.bias, out.readout, query_x, query_y, loss, reduction)


# --- the fused custom ops ----------------------------------------------------------------------

@torch.library.custom_op("metakernels::fast_weight_meta_loss_fwd", mutates_args=())
def _meta_fwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
              lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor], query_x: Tensor,
              query_y: Tensor, loss: int, first_order: bool, store_states: bool,
              keep_weight: bool, grad_bias_lr_scale: bool, reduction: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (the meta-loss, W_T or [0] (kept for query_x's gradient), residual E_t, states W_t
    or [0], query residual Ê)."""
    return _forward_kernels(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y,
                            loss, store_states, keep_weight, grad_bias_lr_scale, reduction,
                            backend)


def _forward_kernels(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, loss,
                     store_states, keep_weight, grad_bias_lr_scale, reduction,
                     backend) -> tuple:
    if loss == LOSS_CODES["ce"]:
        _checks.check_label_range("y", y, weight.shape[-1])
        _checks.check_label_range("query_y", query_y, weight.shape[-1])
    task_loss, weight_t, _, residual, states, query_residual = _backends.kernels(
        backend).meta_loss_forward(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x,
                                   query_y, loss, store_states, keep_weight,
                                   grad_bias_lr_scale)
    meta_loss = reduce_tasks(task_loss, REDUCTIONS[reduction])
    return meta_loss, weight_t, residual, states, query_residual


@_meta_fwd.register_fake
def _meta_fwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, loss,
                   first_order, store_states, keep_weight, grad_bias_lr_scale, reduction,
                   backend):
    tasks, steps = lr.shape
    support, d_in, d_out = x.shape[-2], weight.shape[-2], weight.shape[-1]
    meta_loss = (weight.new_empty(tasks) if REDUCTIONS[reduction] == "none"
                 else weight.new_empty(()))
    return (meta_loss,
            weight.new_empty(tasks, d_in, d_out) if keep_weight else weight.new_empty(0),
            weight.new_empty(tasks, steps, support, d_out),
            weight.new_empty(tasks, steps, d_in, d_out) if store_states else weight.new_empty(0),
            weight.new_empty(tuple(query_x.shape[:-1]) + (d_out,)))


def _meta_setup_context(ctx, inputs, output):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, loss, first_order, _, _,
     _, reduction, backend) = inputs
    _, weight_t, residual, states, query_residual = output
    ctx.save_for_backward(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y,
                          residual, states, weight_t, query_residual)
    ctx.loss, ctx.first_order, ctx.reduction, ctx.backend = loss, first_order, reduction, backend
    ctx.mark_non_differentiable(weight_t, residual, states, query_residual)
    ctx.set_materialize_grads(False)


def _wanted(ctx) -> list[bool]:
    """Which of the 9 differentiable inputs get a gradient: x and y none in first order (except
    through nothing: they enter only the inner loss), ce labels never."""
    first_order, mse = ctx.first_order, ctx.loss == LOSS_CODES["mse"]
    flows = (True, not first_order, not first_order and mse, True, True, True, True, True, mse)
    return [bool(need and flow) for need, flow in zip(ctx.needs_input_grad[:9], flows)]


def _meta_backward(ctx, grad_meta_loss, *_unused):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, residual, states,
     weight_t, query_residual) = ctx.saved_tensors
    wanted = _wanted(ctx)
    if grad_meta_loss is None or not any(wanted):
        return (None,) * 16
    grad_task = _task_grads(grad_meta_loss, lr.shape[0], REDUCTIONS[ctx.reduction])
    direct = not torch.is_grad_enabled() and _unroll._plain_eager(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, residual, states,
        weight_t, query_residual, grad_task)
    need_states = (wanted[1] and not ctx.first_order) or (wanted[7] and query_x.dim() == 4)
    if need_states and states.dim() != 4:
        # The forward was told no W_t would be needed (store_states is a memory hint); recompute.
        args = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, ctx.loss)
        states = (_backends.kernels(ctx.backend).meta_loss_forward(*args, True, False, True)
                  if direct else torch.ops.metakernels.fast_weight_meta_loss_fwd(
                      *args, ctx.first_order, True, False, True, ctx.reduction, ctx.backend))[
                          4 if direct else 3]
    args = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, residual, states,
            weight_t, query_residual, grad_task, ctx.loss, ctx.first_order, wanted)
    grads = (_backends.kernels(ctx.backend).meta_loss_backward(*args, None, None) if direct else
             torch.ops.metakernels.fast_weight_meta_loss_bwd(*args, ctx.backend))
    return tuple(g if want else None for g, want in zip(grads, wanted)) + (None,) * 7


_meta_fwd.register_autograd(_meta_backward, setup_context=_meta_setup_context)


class _EagerMetaLoss(torch.autograd.Function):
    """fast_weight_meta_loss_fwd with its registered autograd, for plain eager calls."""

    @staticmethod
    def forward(ctx, *inputs):
        (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, loss, _,
         store_states, keep_weight, grad_blr, reduction, backend) = inputs
        output = _forward_kernels(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x,
                                  query_y, loss, store_states, keep_weight, grad_blr, reduction,
                                  backend)
        _meta_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _meta_backward(ctx, *grads)


@torch.library.custom_op("metakernels::fast_weight_meta_loss_bwd", mutates_args=())
def _meta_bwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
              lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor], query_x: Tensor,
              query_y: Tensor, residual: Tensor, states: Tensor, weight_t: Tensor,
              query_residual: Tensor, grad_task: Tensor, loss: int, first_order: bool,
              wanted: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                          Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y),
    each an empty tensor where not wanted."""
    return tuple(_backends.kernels(backend).meta_loss_backward(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, residual, states,
        weight_t, query_residual, grad_task, loss, first_order, wanted, None, None))


@_meta_bwd.register_fake
def _meta_bwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, residual,
                   states, weight_t, query_residual, grad_task, loss, first_order, wanted,
                   backend):
    return _unroll._grads_fake((weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x,
                                query_y), wanted)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "metakernels: the backward of fast_weight_meta_loss (a fused kernel computing the exact "
        "second-order meta-gradient) cannot be differentiated again. Double backward through "
        "it is not supported; use backend='reference' for higher-order derivatives.")


_meta_bwd.register_autograd(_no_double_backward)


# --- checkpointed: the same kernels, segment by segment --------------------------------------------
#
# The forward runs the fused forward on segments of `segment` steps (form A: the plain unroll on
# all but the last), summing each segment's readout loss and keeping only the later segments'
# start weights; the backward recomputes one segment at a time and runs the fused backward on it,
# the gradient of the segment's start weight and bias becoming the incoming adjoint of W_T and b_T
# of the segment before (fast_weight_unroll's checkpointing, without its nested sub-segments).

@torch.library.custom_op("metakernels::fast_weight_meta_loss_ckpt_fwd", mutates_args=())
def _ckpt_fwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
              lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor], query_x: Tensor,
              query_y: Tensor, loss: int, first_order: bool, segment: int, reduction: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (the meta-loss, the weights at the start of segments 1 … S−1
    ``[S − 1, B, d_in, d_out]``, their biases ``[S − 1, B, d_out]`` or [0])."""
    if loss == LOSS_CODES["ce"]:
        _checks.check_label_range("y", y, weight.shape[-1])
        _checks.check_label_range("query_y", query_y, weight.shape[-1])
    kernels = _backends.kernels(backend)
    tasks, steps = lr.shape
    segments = _unroll._segments(steps, segment)
    starts_w, starts_b = _unroll._new_segment_starts(weight, bias, len(segments), tasks)
    task_loss = weight.new_zeros(tasks)
    state_weight, state_bias = weight, bias
    for index, (start, stop) in enumerate(segments):
        _unroll._keep_segment_start(starts_w, starts_b, index, state_weight, state_bias)
        seg_x, seg_y, seg_lr, seg_query_x, seg_query_y = _segment_meta_inputs(
            x, y, lr, query_x, query_y, start, stop)
        if seg_query_x is not None:
            out = kernels.meta_loss_forward(state_weight, seg_x, seg_y, seg_lr, state_bias,
                                            lr_scale, bias_lr_scale, seg_query_x, seg_query_y,
                                            loss, False, True, False)
            task_loss += out[0]
            state_weight, state_bias = out[1], out[2] if bias is not None else None
        else:
            out = kernels.unroll_forward(state_weight, seg_x, seg_y, seg_lr, state_bias, lr_scale,
                                         bias_lr_scale, None, loss, False)
            state_weight, state_bias = out[0], out[1] if bias is not None else None
        del out
    return reduce_tasks(task_loss, REDUCTIONS[reduction]), starts_w, starts_b


def _segment_meta_inputs(x, y, lr, query_x, query_y, start, stop):
    """x, y, lr for steps [start, stop), and the query set whose loss the segment computes:
    form B its own steps' slice; form A the whole query set in the last segment, None before."""
    form_b = query_x.dim() == 4
    seg_x, seg_y, seg_lr, seg_query_x = _unroll._segment_inputs(
        x, y, lr, query_x if form_b else None, start, stop)
    if form_b:
        return seg_x, seg_y, seg_lr, seg_query_x, query_y[:, start:stop]
    if stop == lr.shape[1]:
        return seg_x, seg_y, seg_lr, query_x, query_y
    return seg_x, seg_y, seg_lr, None, None


@_ckpt_fwd.register_fake
def _ckpt_fwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, loss,
                   first_order, segment, reduction, backend):
    tasks, steps = lr.shape
    starts = len(_unroll._segments(steps, segment)) - 1
    meta_loss = (weight.new_empty(tasks) if REDUCTIONS[reduction] == "none"
                 else weight.new_empty(()))
    return (meta_loss, weight.new_empty(starts, tasks, weight.shape[-2], weight.shape[-1]),
            weight.new_empty(starts, tasks, weight.shape[-1]) if bias is not None
            else weight.new_empty(0))


def _ckpt_setup_context(ctx, inputs, output):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, loss, first_order,
     segment, reduction, backend) = inputs
    _, starts_w, starts_b = output
    ctx.save_for_backward(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y,
                          starts_w, starts_b)
    ctx.loss, ctx.first_order, ctx.segment = loss, first_order, segment
    ctx.reduction, ctx.backend = reduction, backend
    ctx.mark_non_differentiable(starts_w, starts_b)
    ctx.set_materialize_grads(False)


def _ckpt_backward(ctx, grad_meta_loss, _grad_starts_w, _grad_starts_b):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, starts_w,
     starts_b) = ctx.saved_tensors
    wanted = _wanted(ctx)
    if grad_meta_loss is None or not any(wanted):
        return (None,) * 14
    grads = torch.ops.metakernels.fast_weight_meta_loss_ckpt_bwd(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, starts_w, starts_b,
        _task_grads(grad_meta_loss, lr.shape[0], REDUCTIONS[ctx.reduction]), ctx.loss,
        ctx.first_order, wanted, ctx.segment, ctx.backend)
    return tuple(g if want else None for g, want in zip(grads, wanted)) + (None,) * 5


def _task_grads(grad_meta_loss: Tensor, tasks: int, reduction: str) -> Tensor:
    """c ``[B]``, the upstream gradient of each task's loss."""
    grad_task = grad_meta_loss.expand(tasks) if reduction != "none" else grad_meta_loss
    return (grad_task / tasks if reduction == "mean" else grad_task).contiguous()


_ckpt_fwd.register_autograd(_ckpt_backward, setup_context=_ckpt_setup_context)


@torch.library.custom_op("metakernels::fast_weight_meta_loss_ckpt_bwd", mutates_args=())
def _ckpt_bwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
              lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor], query_x: Tensor,
              query_y: Tensor, starts_w: Tensor, starts_b: Tensor, grad_task: Tensor, loss: int,
              first_order: bool, wanted: list[bool], segment: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                     Tensor, Tensor]:
    """The gradients of (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y),
    segment by segment from the last; each an empty tensor where not wanted."""
    kernels = _backends.kernels(backend)
    starts = _unroll._segment_starts(weight, bias, starts_w, starts_b)
    per_step, form_b = x.dim() == 4, query_x.dim() == 4
    need_states = (wanted[1] and not first_order) or (wanted[7] and form_b)
    out = [weight.new_empty(0) for _ in range(9)]
    # Per-step gradients are written slice by slice; the others are summed over segments (form
    # A's query set: only the last segment has it).
    sliced = {1: per_step, 2: per_step, 3: True, 7: form_b, 8: form_b}
    inputs = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y)
    for i, is_sliced in sliced.items():
        if wanted[i] and is_sliced:
            out[i] = inputs[i].new_empty(inputs[i].shape)
    adj_weight = adj_bias = None
    summed: set = set()
    segments = _unroll._segments(lr.shape[1], segment)
    for index in reversed(range(len(segments))):
        start, stop = segments[index]
        seg_weight, seg_bias = starts[index]
        seg_x, seg_y, seg_lr, seg_query_x, seg_query_y = _segment_meta_inputs(
            x, y, lr, query_x, query_y, start, stop)
        seg_wanted = list(wanted)
        if index > 0:  # the start weight's (and bias's) gradient chains to the segment before
            seg_wanted[0], seg_wanted[4] = True, seg_bias is not None
        if seg_query_x is not None:
            fwd = kernels.meta_loss_forward(seg_weight, seg_x, seg_y, seg_lr, seg_bias, lr_scale,
                                            bias_lr_scale, seg_query_x, seg_query_y, loss,
                                            need_states, True, wanted[6])
            grads = kernels.meta_loss_backward(
                seg_weight, seg_x, seg_y, seg_lr, seg_bias, lr_scale, bias_lr_scale, seg_query_x,
                seg_query_y, fwd[3], fwd[4], fwd[1], fwd[5], grad_task, loss, first_order,
                seg_wanted, adj_weight, adj_bias)
        else:  # form A before the last segment: the unroll alone, from the later adjoints
            fwd = kernels.unroll_forward(seg_weight, seg_x, seg_y, seg_lr, seg_bias, lr_scale,
                                         bias_lr_scale, None, loss, need_states)
            grads = kernels.unroll_backward(
                seg_weight, seg_x, seg_y, seg_lr, seg_bias, lr_scale, bias_lr_scale, None,
                fwd[4], fwd[5], fwd[0], adj_weight, adj_bias, None, loss, first_order,
                seg_wanted[:7] + [False])
        del fwd  # one segment's recomputed states at a time
        if index == 0:
            out[0], out[4] = grads[0], grads[4]
        else:
            adj_weight = grads[0]
            adj_bias = grads[4] if seg_bias is not None else None
        for i, is_sliced in sliced.items():
            if wanted[i] and is_sliced:
                out[i][:, start:stop] = grads[i]
        for i in (1, 2, 5, 6, 7, 8):
            if wanted[i] and not sliced.get(i, False) and (i < 7 or seg_query_x is not None):
                out[i] = grads[i] if i not in summed else out[i] + grads[i]
                summed.add(i)
        del grads
    return tuple(out)


@_ckpt_bwd.register_fake
def _ckpt_bwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y, starts_w,
                   starts_b, grad_task, loss, first_order, wanted, segment, backend):
    return _unroll._grads_fake((weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x,
                                query_y), wanted)


_ckpt_bwd.register_autograd(_no_double_backward)
