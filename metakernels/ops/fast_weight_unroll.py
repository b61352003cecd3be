"""``fast_weight_unroll``: T inner-loop steps for B tasks at once (docs/ops/fast_weight_unroll.md).

The public function checks the contract once, picks a backend and returns an
:class:`UnrollOutput`. The compiled backends run behind the custom ops
``metakernels::fast_weight_unroll_fwd`` / ``_bwd`` (``torch.library``), so the op works under
autograd, ``torch.func``-free trainers and ``torch.compile``; a plain eager call runs the same
kernels, setup_context and backward through a ``torch.autograd.Function`` instead, skipping the
custom ops' Python dispatch (see ``_plain_eager``). The backward of the fused op is the
exact second-order meta-gradient computed by the kernel; differentiating that backward again
(double backward) is not supported and raises.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from metakernels import reference
from metakernels._losses import LOSS_CODES
from metakernels.ops import _autocast, _backends, _checks

# The gradients the backward op can return, in its order.
GRAD_INPUTS = ("weight", "x", "y", "lr", "bias", "lr_scale", "bias_lr_scale", "queries")


class UnrollOutput(NamedTuple):
    """What :func:`fast_weight_unroll` returns.

    weight:  ``[B, d_in, d_out]`` W_T, the adapted fast weights of every task.
    bias:    ``[B, d_out]`` b_T, or None without a bias.
    losses:  ``[B, T]`` the inner loss at (W_t, b_t) before step t; detached.
    readout: ``[B, T, m, d_out]`` ``queries[:, t] @ W_{t+1} + b_{t+1}``, or None without queries.
    """

    weight: Tensor
    bias: Optional[Tensor]
    losses: Tensor
    readout: Optional[Tensor]


@_autocast.autocast_op
def fast_weight_unroll(weight: Tensor, x: Tensor, y: Tensor, lr, *, steps: int | None = None,
                       loss: str = "mse", bias: Tensor | None = None,
                       lr_scale: Tensor | None = None, bias_lr_scale: Tensor | None = None,
                       queries: Tensor | None = None, first_order: bool = False,
                       backend: str = "auto", checkpoint: bool | None = None) -> UnrollOutput:
    r"""Run T steps of gradient descent on a linear model for B tasks at once.

    Per task, with ``P = lr_scale`` and ``p = bias_lr_scale`` (ones when None)::

        Z_t = X_t W_t + 1 b_tᵀ
        G_t = X_tᵀ E_t,  g_t = 1ᵀ E_t,  E_t = ∂ℓ_t/∂Z_t     (ℓ: mse or ce, mean over the n rows)
        W_{t+1} = W_t − η_t (P ∘ G_t),   b_{t+1} = b_t − η_t (p ∘ g_t)
        O_t = Q_t W_{t+1} + 1 b_{t+1}ᵀ

    The backward is the exact meta-gradient through all T steps (second order: the
    Hessian-vector products of MAML), or first order with ``first_order=True``.

    Args:
        weight: ``[d_in, d_out]`` shared meta-init (its gradient sums over tasks) or
            ``[B, d_in, d_out]`` per task.
        x: ``[B, n, d_in]`` with ``steps=T`` (the same support set every step: MAML) or
            ``[B, T, n, d_in]`` (one batch per step: a trajectory).
        y: mse: float targets shaped like x with ``d_out`` last; ce: integer labels
            ``[B, n]`` or ``[B, T, n]`` in ``[0, d_out)``.
        lr: python float, or a tensor broadcastable to ``[B, T]`` (``[]``, ``[T]``, ``[B, 1]``,
            ``[B, T]``); differentiable.
        steps: T, with 3-D x only.
        loss: ``"mse"`` (½‖z − y‖² over n) or ``"ce"`` (softmax cross-entropy over n).
        bias: None, ``[d_out]`` shared or ``[B, d_out]``.
        lr_scale: None or ``[d_in, d_out]`` (Meta-SGD); differentiable.
        bias_lr_scale: None or ``[d_out]``; needs ``bias``; differentiable.
        queries: None or ``[B, T, m, d_in]``; the readout after every step; differentiable.
        first_order: FOMAML: drop every gradient term that passes through the inner gradient.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; see
            :func:`available_backends`.
        checkpoint: the memory of the backward of a compiled backend. ``False``: the forward
            keeps E_t, and W_t where needed, for every step. ``True``: it keeps only the fast
            weights at the start of every segment of ``⌈√T⌉`` steps,
            ``[⌈T/⌈√T⌉⌉ − 1, B, d_in, d_out]``, and the backward recomputes each segment with the
            forward kernel before running the backward kernel on it (about one more forward in
            time); where the backward needs W_t, a segment of L steps is recomputed in turn in
            sub-segments of ``⌈√L⌉`` steps (one forward more, and about 2√L W_t at once instead
            of L). ``None`` (default): ``True`` when the per-step tensors the backward would keep
            (W_t where needed, and E_t) take more than :data:`CHECKPOINT_BYTES` (256 MiB), else
            ``False``. Ignored by the reference backend and when no gradient is recorded.

    Returns:
        :class:`UnrollOutput` ``(weight, bias, losses, readout)``.

    Memory (compiled backends, without checkpointing): E_t for every step,
    ``[B, T, n, d_out]``, and W_t for every step, ``[B, T, d_in, d_out]``, only when the backward
    needs them: x's gradient in second order, or the queries' gradient. With checkpointing, the
    segment starts above, and during the backward one segment's E_t and, where needed, its
    sub-segment starts and one sub-segment's W_t. The reference
    backend keeps the whole autograd graph.

    Algorithm (cpu backend): for mse with 3-D x, no ``lr_scale`` and ``bias_lr_scale`` absent
    or all ones, where it is cheaper (n small next to d_in, T ≥ 2), the exact Gram-space form:
    with ``K = X̃ X̃ᵀ / n`` (X̃ = [X 1]), ``R_{t+1} = (I − η_t K) R_t`` and
    ``W_T = W_0 − (1/n) X̃ᵀ S R_0``, ``S = Σ_t η_t Π_{s<t}(I − η_s K)``, so the T steps cost
    about one step plus n × n work, forward and backward (a readout adds its own products).
    Otherwise the step loop.
    :func:`unroll_path` says which one a call runs.
    """
    plan = _plan(weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale, queries,
                 first_order, backend, checkpoint)
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, queries = plan.args
    if plan.backend == "reference":
        if loss == "ce":
            _checks.check_label_range("y", y, weight.shape[-1])
        return UnrollOutput(*reference.fast_weight_unroll(
            weight, x, y, lr, steps=steps, loss=loss, bias=bias, lr_scale=lr_scale,
            bias_lr_scale=bias_lr_scale, queries=queries, first_order=first_order))
    if plan.segment:
        weight_t, bias_t, losses, readout, _, _ = torch.ops.metakernels.fast_weight_unroll_ckpt_fwd(
            weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, LOSS_CODES[loss],
            first_order, plan.segment, plan.backend)
    else:
        args = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, LOSS_CODES[loss],
                first_order, plan.store_states, plan.backend)
        if _plain_eager(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries):
            weight_t, bias_t, losses, readout, _, _ = _EagerUnroll.apply(*args)
        else:
            weight_t, bias_t, losses, readout, _, _ = torch.ops.metakernels.fast_weight_unroll_fwd(
                *args)
    return UnrollOutput(weight_t, bias_t if bias is not None else None, losses,
                        readout if queries is not None else None)


# Checkpoint by default above this many bytes of per-step saved tensors (checkpoint=None).
CHECKPOINT_BYTES = 256 * 2 ** 20


class _Plan(NamedTuple):
    args: tuple        # the checked, normalised arguments (see _check)
    backend: str       # the backend that runs
    store_states: bool  # whether the backward needs W_t of every step
    segment: int       # checkpoint segment length in steps, 0 without checkpointing


def checkpoint_segment(steps: int) -> int:
    """The checkpoint segment length for T steps: ⌈√T⌉."""
    return math.isqrt(steps - 1) + 1 if steps > 1 else 1


def _plan(weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale, queries, first_order,
          backend, checkpoint) -> _Plan:
    """Checks the arguments and decides how the call runs (from shapes and flags only, so that
    torch.compile traces it)."""
    if checkpoint is not None and not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be None, True or False, got {type(checkpoint).__name__}")
    args = _check(weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale, queries,
                  first_order, backend)
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, queries = args
    which = _backends.resolve(backend, weight.device, weight.dtype)
    grad = torch.is_grad_enabled()
    store_states = _wants_states(x, queries, first_order) and not _chunked_backward(
        which, LOSS_CODES[loss], weight, x, lr_scale, bias_lr_scale, queries)
    if checkpoint is None:
        tasks, support, d_in, d_out = x.shape[0], x.shape[-2], weight.shape[-2], weight.shape[-1]
        per_step = support * d_out + (d_in * d_out if store_states else 0)
        itemsize = torch.finfo(state_dtype(weight.dtype)).bits // 8
        checkpoint = tasks * steps * per_step * itemsize > CHECKPOINT_BYTES
    segment = checkpoint_segment(steps) if checkpoint and grad and which != "reference" else 0
    return _Plan(args, which, store_states, segment)


def _wants_states(x, queries, first_order) -> bool:
    """Whether the backward wants W_t of every step, in the current grad mode: x's gradient in
    second order, or the queries'."""
    return torch.is_grad_enabled() and (
        (x.requires_grad and not first_order) or (queries is not None and queries.requires_grad))


def _chunked_backward(backend: str, loss: int, weight, x, lr_scale, bias_lr_scale,
                      queries) -> bool:
    """Whether the backward of a call that wants W_t (x's gradient in second order, or the
    queries') runs the chunked path instead (cpu, triton; mse, 4-D x, no lr_scale or
    bias_lr_scale, sizes where it is expected to be faster: README, "The chunked form"), which
    needs none: then the forward keeps none. From shapes and flags only (with bias_lr_scale
    given, all ones, the kernels may still take it; the forward then keeps W_t)."""
    if backend not in ("cpu", "triton") or loss != LOSS_CODES["mse"] or x.dim() != 4 \
            or lr_scale is not None or bias_lr_scale is not None:
        return False
    return _chunked_expected(backend, x.shape[1], x.shape[2], weight.shape[-2], weight.shape[-1],
                             0 if queries is None else queries.shape[2])


@torch.compiler.assume_constant_result
def _chunked_expected(backend: str, steps: int, n: int, d_in: int, d_out: int, m: int) -> bool:
    """The kernel module's size rule with stored states wanted (False for a module without a
    chunked path); a constant for torch.compile, which cannot trace into the extension."""
    expected = getattr(_backends.kernels(backend), "chunked_expected", None)
    return bool(expected is not None and expected(steps, n, d_in, d_out, m, True))


def unroll_path(weight: Tensor, x: Tensor, y: Tensor, lr, *, steps: int | None = None,
                loss: str = "mse", bias: Tensor | None = None, lr_scale: Tensor | None = None,
                bias_lr_scale: Tensor | None = None, queries: Tensor | None = None,
                first_order: bool = False, backend: str = "auto",
                checkpoint: bool | None = None) -> str:
    """Which algorithm :func:`fast_weight_unroll` runs for these arguments (in the current grad
    mode): ``"reference"``; ``"gram"`` (the Gram-space form, cpu backend), ``"chunked"`` (the
    chunked form of 4-D x, cpu backend), ``"steps"`` (the step loop), or ``"steps/gram"``,
    ``"steps/chunked"`` (a forward that stores W_t, then the other backward);
    with `` + checkpoint(L)`` appended when the backward recomputes segments of L steps."""
    plan = _plan(weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale, queries,
                 first_order, backend, checkpoint)
    if plan.backend == "reference":
        return "reference"
    weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, queries = plan.args
    module = _backends.kernels(plan.backend)
    path = "steps"
    if hasattr(module, "unroll_path"):
        # Checkpointed segments run the kernels without storing W_t in the forward.
        path = module.unroll_path(
            weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, LOSS_CODES[loss],
            plan.store_states and not plan.segment,
            bias_lr_scale is not None and bias_lr_scale.requires_grad and torch.is_grad_enabled(),
            _wants_states(x, queries, first_order))
    return path + (f" + checkpoint({plan.segment})" if plan.segment else "")


def _check(weight, x, y, lr, steps, loss, bias, lr_scale, bias_lr_scale, queries, first_order,
           backend="auto"):
    """Checks the arguments (docs/ops/fast_weight_unroll.md); returns them normalised: lr a ``[B,
    T]`` tensor, T, and ce labels as int64."""
    for name, value in (("weight", weight), ("x", x), ("y", y)):
        _checks.require_tensor(name, value)
    for name, value in (("bias", bias), ("lr_scale", lr_scale), ("bias_lr_scale", bias_lr_scale),
                        ("queries", queries)):
        _checks.require_tensor(name, value, optional=True)
    _checks.check_loss(loss)
    _checks.check_flag("first_order", first_order)
    dtype = _checks.check_float_dtype(weight, backend)
    device = weight.device

    if weight.dim() not in (2, 3):
        raise ValueError(f"weight has shape {_checks.shape_str(weight.shape)}, expected "
                         "[d_in, d_out] (shared) or [B, d_in, d_out]")
    steps = _checks.check_steps("x", x, steps)
    tasks, support, d_in = x.shape[0], x.shape[-2], x.shape[-1]
    d_out = weight.shape[-1]
    if weight.shape[-2] < 1 or d_out < 1:
        raise ValueError(f"weight has shape {_checks.shape_str(weight.shape)}; d_in and d_out "
                         "must be at least 1")
    _checks.check_shape("weight", weight, (d_in, d_out), (tasks, d_in, d_out))
    if support < 1:
        raise ValueError(f"x has shape {_checks.shape_str(x.shape)}: n = 0 support rows, "
                         "expected at least 1")

    lead = tuple(x.shape[:-1])
    if loss == "mse":
        if not y.dtype.is_floating_point:
            raise ValueError(f"y has dtype {str(y.dtype).replace('torch.', '')}; loss='mse' takes "
                             "float targets (for class labels use loss='ce')")
        _checks.check_shape("y", y, lead + (d_out,))
    else:
        _checks.check_shape("y", y, lead)
        y = _checks.check_labels("y", y, d_out)

    if isinstance(lr, bool) or not isinstance(lr, (int, float, Tensor)):
        raise TypeError(f"lr must be a float or a tensor, got {type(lr).__name__}")
    if not isinstance(lr, Tensor):
        lr = torch.full((tasks, steps), float(lr), dtype=dtype, device=device)
    else:
        if not lr.dtype.is_floating_point:
            raise ValueError(f"lr has dtype {str(lr.dtype).replace('torch.', '')}, expected "
                             f"{str(dtype).replace('torch.', '')} like weight")
        try:
            broadcast = torch.broadcast_shapes(lr.shape, (tasks, steps))
        except RuntimeError:
            broadcast = None
        if lr.dim() > 2 or broadcast != (tasks, steps):
            raise ValueError(f"lr has shape {_checks.shape_str(lr.shape)}, which does not "
                             f"broadcast to [B, T] = {_checks.shape_str((tasks, steps))}; use [], "
                             "[T], [B, 1] or [B, T]")

    _checks.check_shape("bias", bias, (d_out,), (tasks, d_out))
    _checks.check_shape("lr_scale", lr_scale, (d_in, d_out))
    _checks.check_shape("bias_lr_scale", bias_lr_scale, (d_out,))
    if bias_lr_scale is not None and bias is None:
        raise ValueError("bias_lr_scale was given without bias; it scales the bias's step")
    if queries is not None:
        if queries.dim() != 4:
            raise ValueError(f"queries has shape {_checks.shape_str(queries.shape)}, expected "
                             f"[B, T, m, d_in] = [{tasks}, {steps}, m, {d_in}]")
        _checks.check_shape("queries", queries, (tasks, steps, queries.shape[2], d_in))

    floats = {"x": x, "lr": lr, "bias": bias, "lr_scale": lr_scale,
              "bias_lr_scale": bias_lr_scale, "queries": queries}
    if loss == "mse":
        floats["y"] = y
    for name, tensor in floats.items():
        _checks.check_same_dtype(name, tensor, dtype)
    for name, tensor in dict(floats, y=y).items():
        _checks.check_device(name, tensor, device)
    lr = lr.broadcast_to((tasks, steps))
    return weight, x, y, lr, steps, bias, lr_scale, bias_lr_scale, queries


# --- the custom ops behind the compiled backends -------------------------------------------------

@torch.library.custom_op("metakernels::fast_weight_unroll_fwd", mutates_args=())
def _unroll_fwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
                lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor],
                queries: Optional[Tensor], loss: int, first_order: bool,
                store_states: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                           Tensor]:
    """Returns (W_T, b_T or [0], losses, readout or [0], residual E_t, states W_t or [0]), from
    the kernels of compiled backend ``backend`` ("cpu", "triton" or "cuda")."""
    return _forward_kernels(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                            store_states, backend)


def _forward_kernels(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, store_states,
                     backend) -> tuple:
    """The body of fast_weight_unroll_fwd (and of its eager fast path, _EagerUnroll)."""
    if loss == LOSS_CODES["ce"]:
        _checks.check_label_range("y", y, weight.shape[-1])
    return tuple(_backends.kernels(backend).unroll_forward(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, store_states))


# --- the eager fast path ------------------------------------------------------------------------
#
# A custom op's Python layers (the dispatcher's round trips into Python, torch.library's argument
# filling and alias checks, the dynamo-disabling wrappers) cost ~0.1 ms a meta-step on the CPU,
# as much as a tenth of maml-small's. In plain eager mode fast_weight_unroll skips them: the
# same kernels, setup_context and backward run through a torch.autograd.Function. Wherever
# something traces or intercepts the call (torch.compile, make_fx and export, fake tensors,
# dispatch or torch-function modes, functorch transforms, tensor subclasses), the custom ops run
# as before, since those need them.

# The types a plain eager call's tensor arguments have (None: an absent optional input).
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter, type(None)))


def _plain_eager(*tensors) -> bool:
    """Whether a call on ``tensors`` (None for an absent input) runs in plain eager mode: nothing
    traces or intercepts it, and every tensor is a plain tensor (or a Parameter)."""
    return (not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
            and _PLAIN_TYPES.issuperset(map(type, tensors)))


class _EagerUnroll(torch.autograd.Function):
    """fast_weight_unroll_fwd with its registered autograd, for plain eager calls: the same
    arguments, outputs and gradients."""

    @staticmethod
    def forward(ctx, *inputs):
        (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, _, store_states,
         backend) = inputs
        output = _forward_kernels(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                                  store_states, backend)
        _unroll_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _unroll_backward(ctx, *grads)


def _outputs_fake(weight, bias, queries, tasks: int, steps: int) -> tuple:
    """The fake (W_T, b_T or [0], losses, readout or [0]) that both forward ops return first."""
    d_in, d_out = weight.shape[-2], weight.shape[-1]
    return (
        weight.new_empty(tasks, d_in, d_out),
        weight.new_empty(tasks, d_out) if bias is not None else weight.new_empty(0),
        weight.new_empty(tasks, steps),
        weight.new_empty(tasks, steps, queries.shape[2], d_out) if queries is not None
        else weight.new_empty(0),
    )


@_unroll_fwd.register_fake
def _unroll_fwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, first_order,
                     store_states, backend):
    tasks, steps = lr.shape
    support, d_in, d_out = x.shape[-2], weight.shape[-2], weight.shape[-1]
    state = state_dtype(weight.dtype)
    return _outputs_fake(weight, bias, queries, tasks, steps) + (
        weight.new_empty(tasks, steps, support, d_out, dtype=state),
        weight.new_empty(tasks, steps, d_in, d_out, dtype=state) if store_states
        else weight.new_empty(0, dtype=state),
    )


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved residual E_t and states W_t: float32 for bfloat16/float16 inputs
    (docs/conventions.md, dtypes: the fast-weight state is float32), else the inputs' own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _unroll_setup_context(ctx, inputs, output):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, first_order, _,
     backend) = inputs
    weight_t, _, losses, _, residual, states = output
    ctx.save_for_backward(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, residual,
                          states, weight_t)
    ctx.loss, ctx.first_order, ctx.backend = loss, first_order, backend
    ctx.mark_non_differentiable(losses, residual, states)
    # Unused outputs (the saved residual and states above all) get None, not a zero-filled tensor.
    ctx.set_materialize_grads(False)


def _unroll_backward(ctx, grad_weight_t, grad_bias_t, _grad_losses, grad_readout, _grad_residual,
                     _grad_states):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, residual, states,
     weight_t) = ctx.saved_tensors
    first_order = ctx.first_order
    wanted = _wanted_grads(ctx)
    if grad_weight_t is None:
        grad_weight_t = torch.zeros_like(weight_t)
    grad_bias_t = grad_bias_t if bias is not None else None
    grad_readout = grad_readout if queries is not None else None
    # Plain eager without grad mode (the usual backward, not create_graph=True): the kernels
    # directly. Otherwise the custom ops, which tracing needs and whose autograd raises on a
    # double backward.
    direct = not torch.is_grad_enabled() and _plain_eager(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, residual, states, weight_t,
        grad_weight_t, grad_bias_t, grad_readout)
    if (wanted[1] or wanted[7]) and states.dim() != 4 and not _chunked_backward(
            ctx.backend, ctx.loss, weight, x, lr_scale, bias_lr_scale, queries):
        # The forward was told no W_t would be needed (store_states is a memory hint); recompute.
        args = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, ctx.loss)
        states = (_forward_kernels(*args, True, ctx.backend) if direct else
                  torch.ops.metakernels.fast_weight_unroll_fwd(*args, first_order, True,
                                                               ctx.backend))[5]
    args = (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, residual, states, weight_t,
            grad_weight_t, grad_bias_t, grad_readout, ctx.loss, first_order, wanted)
    grads = (_backends.kernels(ctx.backend).unroll_backward(*args) if direct else
             torch.ops.metakernels.fast_weight_unroll_bwd(*args, ctx.backend))
    return tuple(g if want else None for g, want in zip(grads, wanted)) + (None,) * 4


_unroll_fwd.register_autograd(_unroll_backward, setup_context=_unroll_setup_context)


@torch.library.custom_op("metakernels::fast_weight_unroll_bwd", mutates_args=())
def _unroll_bwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
                lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor],
                queries: Optional[Tensor], residual: Tensor, states: Tensor, weight_t: Tensor,
                grad_weight_t: Tensor, grad_bias_t: Optional[Tensor],
                grad_readout: Optional[Tensor], loss: int, first_order: bool,
                wanted: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                             Tensor, Tensor]:
    """The gradients of (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries), each an
    empty tensor where not wanted."""
    return tuple(_backends.kernels(backend).unroll_backward(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, residual, states, weight_t,
        grad_weight_t, grad_bias_t, grad_readout, loss, first_order, wanted))


def _grads_fake(inputs, wanted):
    """The meta outputs of a backward op: each wanted input's gradient shaped like it, in
    weight's (the first input's) dtype; an empty tensor where not wanted."""
    weight = inputs[0]
    return tuple(t.new_empty(t.shape, dtype=weight.dtype) if want else weight.new_empty(0)
                 for t, want in zip(inputs, wanted))


@_unroll_bwd.register_fake
def _unroll_bwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, residual, states,
                     weight_t, grad_weight_t, grad_bias_t, grad_readout, loss, first_order, wanted,
                     backend):
    return _grads_fake((weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries), wanted)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "metakernels: the backward of fast_weight_unroll (a fused kernel computing the exact "
        "second-order meta-gradient) cannot be differentiated again. Double backward through "
        "it is not supported; use backend='reference' for higher-order derivatives.")


_unroll_bwd.register_autograd(_no_double_backward)


# --- checkpointed unroll: the same kernels, segment by segment ------------------------------------
#
# Generic over the compiled backends: the forward runs the backend's forward kernel on segments
# of `segment` steps, chaining W and b and keeping only each later segment's start; the backward
# recomputes one segment at a time (its E_t, and W_t where needed) and runs the backward kernel
# on it, the gradient of the segment's start weight and bias becoming the incoming adjoint of the
# segment before. x, y, lr and queries are sliced per segment (3-D x is shared by all of them).

def _new_segment_starts(weight: Tensor, bias: Tensor | None, segment_count: int,
                        tasks: int) -> tuple[Tensor, Tensor]:
    """Buffers for the fast weights (and bias) at the start of every segment but the first:
    ``[segments - 1, B, d_in, d_out]`` and ``[segments - 1, B, d_out]`` (empty without bias)."""
    starts_w = weight.new_empty(segment_count - 1, tasks, weight.shape[-2], weight.shape[-1])
    starts_b = (weight.new_empty(segment_count - 1, tasks, weight.shape[-1]) if bias is not None
                else weight.new_empty(0))
    return starts_w, starts_b


def _keep_segment_start(starts_w: Tensor, starts_b: Tensor, index: int, weight: Tensor,
                        bias: Tensor | None) -> None:
    """Keeps the state that segment ``index`` starts from (the first one's is the init)."""
    if index > 0:
        starts_w[index - 1] = weight
        if bias is not None:
            starts_b[index - 1] = bias


def _segment_starts(weight: Tensor, bias: Tensor | None, starts_w: Tensor,
                    starts_b: Tensor) -> list[tuple[Tensor, Tensor | None]]:
    """(weight, bias) every segment starts from: the init, then what the forward kept."""
    return [(weight, bias)] + [(starts_w[i], starts_b[i] if bias is not None else None)
                               for i in range(starts_w.shape[0])]


def _segments(steps: int, segment: int) -> list[tuple[int, int]]:
    return [(start, min(start + segment, steps)) for start in range(0, steps, segment)]


def _segment_inputs(x, y, lr, queries, start, stop):
    """x, y, lr and queries for steps [start, stop)."""
    per_step = x.dim() == 4
    return (x[:, start:stop] if per_step else x, y[:, start:stop] if per_step else y,
            lr[:, start:stop], None if queries is None else queries[:, start:stop])


@torch.library.custom_op("metakernels::fast_weight_unroll_ckpt_fwd", mutates_args=())
def _ckpt_fwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
              lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor],
              queries: Optional[Tensor], loss: int, first_order: bool, segment: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (W_T, b_T or [0], losses, readout or [0], the weights at the start of segments
    1 … S−1 ``[S − 1, B, d_in, d_out]``, their biases ``[S − 1, B, d_out]`` or [0])."""
    if loss == LOSS_CODES["ce"]:
        _checks.check_label_range("y", y, weight.shape[-1])
    kernels = _backends.kernels(backend)
    tasks, steps = lr.shape
    d_out = weight.shape[-1]
    segments = _segments(steps, segment)
    # Written segment by segment, so that no segment's outputs outlive it.
    starts_w, starts_b = _new_segment_starts(weight, bias, len(segments), tasks)
    losses = weight.new_empty(tasks, steps)
    readout = (weight.new_empty(tasks, steps, queries.shape[2], d_out) if queries is not None
               else weight.new_empty(0))
    state_weight, state_bias = weight, bias
    for index, (start, stop) in enumerate(segments):
        _keep_segment_start(starts_w, starts_b, index, state_weight, state_bias)
        seg_x, seg_y, seg_lr, seg_queries = _segment_inputs(x, y, lr, queries, start, stop)
        out = kernels.unroll_forward(state_weight, seg_x, seg_y, seg_lr, state_bias, lr_scale,
                                     bias_lr_scale, seg_queries, loss, False)
        state_weight = out[0]
        state_bias = out[1] if bias is not None else None
        losses[:, start:stop] = out[2]
        if queries is not None:
            readout[:, start:stop] = out[3]
        del out
    return (state_weight, state_bias if bias is not None else weight.new_empty(0), losses,
            readout, starts_w, starts_b)


@_ckpt_fwd.register_fake
def _ckpt_fwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, first_order,
                   segment, backend):
    tasks, steps = lr.shape
    d_in, d_out = weight.shape[-2], weight.shape[-1]
    starts = len(_segments(steps, segment)) - 1
    return _outputs_fake(weight, bias, queries, tasks, steps) + (
        weight.new_empty(starts, tasks, d_in, d_out),
        weight.new_empty(starts, tasks, d_out) if bias is not None else weight.new_empty(0),
    )


def _ckpt_setup_context(ctx, inputs, output):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, loss, first_order, segment,
     backend) = inputs
    _, _, losses, _, starts_w, starts_b = output
    ctx.save_for_backward(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, starts_w,
                          starts_b)
    ctx.loss, ctx.first_order, ctx.segment, ctx.backend = loss, first_order, segment, backend
    ctx.mark_non_differentiable(losses, starts_w, starts_b)
    ctx.set_materialize_grads(False)


def _wanted_grads(ctx) -> list[bool]:
    """Which of the 8 differentiable inputs get a gradient: needs_input_grad is False for absent
    inputs; x and y get none in first order, and ce labels never do."""
    first_order = ctx.first_order
    flows = (True, not first_order, not first_order and ctx.loss == LOSS_CODES["mse"], True,
             True, True, True, True)
    return [bool(need and flow) for need, flow in zip(ctx.needs_input_grad[:8], flows)]


def _ckpt_backward(ctx, grad_weight_t, grad_bias_t, _grad_losses, grad_readout, _grad_starts_w,
                   _grad_starts_b):
    (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, starts_w,
     starts_b) = ctx.saved_tensors
    wanted = _wanted_grads(ctx)
    if grad_weight_t is None:
        grad_weight_t = weight.new_zeros(lr.shape[0], weight.shape[-2], weight.shape[-1])
    grads = torch.ops.metakernels.fast_weight_unroll_ckpt_bwd(
        weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, starts_w, starts_b,
        grad_weight_t, grad_bias_t if bias is not None else None,
        grad_readout if queries is not None else None, ctx.loss, ctx.first_order, wanted,
        ctx.segment, ctx.backend)
    return tuple(g if want else None for g, want in zip(grads, wanted)) + (None,) * 4


_ckpt_fwd.register_autograd(_ckpt_backward, setup_context=_ckpt_setup_context)


@torch.library.custom_op("metakernels::fast_weight_unroll_ckpt_bwd", mutates_args=())
def _ckpt_bwd(weight: Tensor, x: Tensor, y: Tensor, lr: Tensor, bias: Optional[Tensor],
              lr_scale: Optional[Tensor], bias_lr_scale: Optional[Tensor],
              queries: Optional[Tensor], starts_w: Tensor, starts_b: Tensor,
              grad_weight_t: Tensor, grad_bias_t: Optional[Tensor],
              grad_readout: Optional[Tensor], loss: int, first_order: bool, wanted: list[bool],
              segment: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                   Tensor, Tensor, Tensor]:
    """The gradients of (weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries) as
    fast_weight_unroll_bwd returns them, segment by segment from the last."""
    starts = _segment_starts(weight, bias, starts_w, starts_b)
    return _backward_by_segments(
        _backends.kernels(backend), starts, x, y, lr, lr_scale, bias_lr_scale, queries,
        grad_weight_t, grad_bias_t, grad_readout, loss, first_order, wanted, segment, nest=True,
        chunked=_chunked_backward(backend, loss, weight, x, lr_scale, bias_lr_scale, queries))


def _backward_by_segments(kernels, starts, x, y, lr, lr_scale, bias_lr_scale, queries,
                          adj_weight, adj_bias, grad_readout, loss, first_order, wanted, segment,
                          nest, chunked=False):
    """unroll_backward's gradients for the steps of ``lr`` (x, y, queries and grad_readout
    cover the same steps), from the (weight, bias) at the start of each segment of ``segment``
    steps, ``starts``. Each segment's W_t are recomputed and dropped before the one before it;
    with ``nest``, a segment longer than 2 steps is itself recomputed in sub-segments of
    ⌈√L⌉ steps from starts found by a forward over it (one more forward, and the W_t held at
    once drop from L to about 2√L)."""
    weight, bias = starts[0]
    steps = lr.shape[1]
    per_step = x.dim() == 4
    # The chunked backward (cpu) reads no W_t.
    need_states = ((wanted[1] and not first_order) or wanted[7]) and not chunked
    out = [weight.new_empty(0) for _ in range(8)]
    # Per-step gradients are written slice by slice; the others are summed over segments.
    if wanted[1] and per_step:
        out[1] = x.new_empty(x.shape)
    if wanted[2] and per_step:
        out[2] = y.new_empty(y.shape)
    if wanted[3]:
        out[3] = lr.new_empty(lr.shape)
    if wanted[7]:
        out[7] = queries.new_empty(queries.shape)
    summed = {1: not per_step, 2: not per_step, 5: True, 6: True}
    segments = _segments(steps, segment)
    for index in reversed(range(len(segments))):
        start, stop = segments[index]
        first = index == 0
        seg_weight, seg_bias = starts[index]
        seg_x, seg_y, seg_lr, seg_queries = _segment_inputs(x, y, lr, queries, start, stop)
        seg_readout = None if grad_readout is None else grad_readout[:, start:stop]
        seg_wanted = list(wanted)
        if not first:  # the start weight's (and bias's) gradient chains to the segment before
            seg_wanted[0], seg_wanted[4] = True, seg_bias is not None
        length = stop - start
        sub = checkpoint_segment(length)
        if nest and need_states and sub < length:
            # The sub-segments' starts, by a forward without W_t or readout.
            sub_starts = [(seg_weight, seg_bias)]
            for sub_start, sub_stop in _segments(length, sub)[:-1]:
                w, b = sub_starts[-1]
                sx, sy, slr, _ = _segment_inputs(seg_x, seg_y, seg_lr, None, sub_start, sub_stop)
                fwd = kernels.unroll_forward(w, sx, sy, slr, b, lr_scale, bias_lr_scale, None,
                                             loss, False)
                sub_starts.append((fwd[0], fwd[1] if b is not None else None))
                del fwd
            grads = _backward_by_segments(
                kernels, sub_starts, seg_x, seg_y, seg_lr, lr_scale, bias_lr_scale, seg_queries,
                adj_weight, adj_bias, seg_readout, loss, first_order, seg_wanted, sub, nest=False,
                chunked=chunked)
            del sub_starts
        else:
            # The recomputation needs E_t (and W_t) only, not the readout: no queries.
            fwd = kernels.unroll_forward(seg_weight, seg_x, seg_y, seg_lr, seg_bias, lr_scale,
                                         bias_lr_scale, None, loss, need_states)
            grads = kernels.unroll_backward(
                seg_weight, seg_x, seg_y, seg_lr, seg_bias, lr_scale, bias_lr_scale, seg_queries,
                fwd[4], fwd[5], fwd[0], adj_weight, adj_bias, seg_readout, loss, first_order,
                seg_wanted)
            del fwd  # one segment's recomputed states at a time
        if first:
            out[0], out[4] = grads[0], grads[4]
        else:
            adj_weight = grads[0]
            adj_bias = grads[4] if seg_bias is not None else None
        for i, sliced in ((1, per_step), (2, per_step), (3, True), (7, True)):
            if wanted[i] and sliced:
                out[i][:, start:stop] = grads[i]
        for i, is_summed in summed.items():
            if wanted[i] and is_summed:
                out[i] = grads[i] if index == len(segments) - 1 else out[i] + grads[i]
        del grads
    return tuple(out)


@_ckpt_bwd.register_fake
def _ckpt_bwd_fake(weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries, starts_w, starts_b,
                   grad_weight_t, grad_bias_t, grad_readout, loss, first_order, wanted, segment,
                   backend):
    return _grads_fake((weight, x, y, lr, bias, lr_scale, bias_lr_scale, queries), wanted)


_ckpt_bwd.register_autograd(_no_double_backward)
