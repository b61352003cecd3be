"""``fast_weight_mlp_unroll`` and ``fast_weight_mlp_meta_loss``: T inner steps of SGD on every
layer of an L-layer perceptron for B tasks at once, with the exact second-order meta-gradient as
the backward (docs/ops/fast_weight_mlp.md).

The public functions check the contract once, normalise the arguments (every layer expanded to
per task, ``lr`` ``[B, T]``; the expansions are ordinary autograd ops, so a shared layer's
gradient is the sum over tasks), pick a backend and run one custom op each way:
``metakernels::fast_weight_mlp_fwd`` / ``_bwd``, whose bodies call ``mlp_forward`` /
``mlp_backward`` on the backend's kernel module (the interface of ``metakernels/_C.pyi``). A
plain eager call runs the same bodies through a ``torch.autograd.Function`` (the eager fast path
of :mod:`metakernels.ops.fast_weight_unroll`). Checkpointing is inside the kernels: the forward
keeps θ_t every ``stride`` steps and the backward recomputes the steps between.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from metakernels import reference
from metakernels._losses import LOSS_CODES
from metakernels.ops import _autocast, _backends, _checks
from metakernels.reference.fast_weight_mlp import ACTIVATIONS, MLPUnrollOutput
from metakernels.reference.meta_loss import REDUCTIONS, reduce_tasks
from metakernels.ops.fast_weight_meta_loss import _checked_query_x, _checked_query_y, _task_grads
from metakernels.ops.fast_weight_unroll import (CHECKPOINT_BYTES, _check, _plain_eager,
                                                checkpoint_segment, state_dtype)



@_autocast.autocast_op
def fast_weight_mlp_unroll(weights, biases, x: Tensor, y: Tensor, lr, *,
                           steps: int | None = None, activation: str = "relu",
                           loss: str = "mse", lr_scale=None, queries: Tensor | None = None,
                           first_order: bool = False, checkpoint: bool | None = None,
                           backend: str = "auto") -> MLPUnrollOutput:
    r"""Run T steps of SGD on every layer of an MLP for B tasks at once.

    Per task, with σ the activation and ``P_l = lr_scale[l]`` (ones when None)::

        H_0 = X_t,  A_l = H_l W_l + 1 b_lᵀ,  H_{l+1} = σ(A_l)   (no σ after the last layer)
        Z_t = A_{L−1};  ℓ_t, E_t = ∂ℓ_t/∂Z_t  (mse or ce, mean over the n rows)
        Δ_{L−1} = E_t,  Δ_{l−1} = (Δ_l W_lᵀ) ∘ σ'(A_{l−1});  G_l = H_lᵀ Δ_l,  g_l = 1ᵀ Δ_l
        W_l ← W_l − η_t (P_l ∘ G_l),  b_l ← b_l − η_t g_l       (every layer from θ_t)

    The backward is the exact meta-gradient through all T steps (second order: each step's
    Hessian-vector product by the R-operator, σ'' included), or first order.

    Args:
        weights: list or tuple of L ≥ 1 tensors, layer l ``[d_l, d_{l+1}]`` (shared: its
            gradient sums over tasks) or ``[B, d_l, d_{l+1}]``; each layer on its own.
        biases: None or L tensors ``[d_{l+1}]`` / ``[B, d_{l+1}]``.
        x: ``[B, n, d_0]`` with ``steps=T`` or ``[B, T, n, d_0]``.
        y: mse: float targets shaped like x with ``d_L`` last; ce: int labels ``[B, n]`` /
            ``[B, T, n]`` in ``[0, d_L)``.
        lr: float or tensor broadcastable to ``[B, T]``; differentiable.
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` (erf form) or ``"silu"``.
        loss: ``"mse"`` or ``"ce"``.
        lr_scale: None or L tensors ``[d_l, d_{l+1}]`` (Meta-SGD; biases' steps unscaled).
        queries: None or ``[B, T, m, d_0]``: the readout, the network at θ_{t+1} on
            ``queries[:, t]``.
        first_order: drop every term through the inner gradient (FOMAML).
        checkpoint: ``False``: the forward keeps θ_t of every step (``B·T·P`` numbers, P the
            parameters of one network). ``True``: only every ``⌈√T⌉``-th, and the backward
            recomputes the steps between (one more forward of the inner loop). ``None``: True
            when the kept θ_t would pass 256 MiB.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``.

    Returns:
        :class:`MLPUnrollOutput` ``(weights, biases, losses, readout)``.
    """
    call = _plan(weights, biases, x, y, lr, steps, activation, loss, lr_scale, queries, None,
                 first_order, "mean", checkpoint, backend, queries_name="queries")
    if call.backend == "reference":
        if loss == "ce":
            _checks.check_label_range("y", call.y, call.weights[-1].shape[-1])
        return reference.fast_weight_mlp_unroll(
            call.weights, call.biases, call.x, call.y, call.lr, steps=call.steps,
            activation=activation, loss=loss, lr_scale=call.lr_scale, queries=call.queries,
            first_order=first_order)
    out = _run(call, first_order, 0)
    layers = len(call.weights)
    has_bias = call.biases is not None
    return MLPUnrollOutput(tuple(out[3:3 + layers]),
                           tuple(out[3 + layers:3 + 2 * layers]) if has_bias else None,
                           out[0], out[1] if queries is not None else None)


@_autocast.autocast_op
def fast_weight_mlp_meta_loss(weights, biases, x: Tensor, y: Tensor, lr, query_x: Tensor,
                              query_y: Tensor, *, steps: int | None = None,
                              activation: str = "relu", loss: str = "mse", lr_scale=None,
                              first_order: bool = False, reduction: str = "mean",
                              checkpoint: bool | None = None, backend: str = "auto") -> Tensor:
    r"""The meta-loss of T inner steps on an MLP for B tasks, with its exact meta-gradient.

    The inner loop is :func:`fast_weight_mlp_unroll`'s; the outer loss the same loss kind, the
    mean over the m query rows::

        form A, query_x [B, m, d_0]:     L = ℓ(f(θ_T; Q), Y_q)               (MAML)
        form B, query_x [B, T, m, d_0]:  L = Σ_t ℓ(f(θ_{t+1}; Q_t), Y_{q,t})   (TTT)

    Args: as :func:`fast_weight_mlp_unroll`, plus ``query_x``, ``query_y`` (mse: float
    ``[..., m, d_L]``; ce: int labels ``[..., m]``) and ``reduction`` (``"mean"`` over tasks,
    ``"sum"``, ``"none"``: ``[B]``). With form B and 3-D x, ``steps`` may be left out (it is
    query_x's T).

    Returns:
        ``[]`` for mean and sum, ``[B]`` for none, in the dtype of ``weights[0]``.
    """
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, one of {REDUCTIONS}, got "
                        f"{type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _checks.require_tensor("query_x", query_x)
    _checks.require_tensor("query_y", query_y)
    if (isinstance(x, Tensor) and x.dim() == 3 and query_x.dim() == 4 and steps is None):
        steps = query_x.shape[1]
    call = _plan(weights, biases, x, y, lr, steps, activation, loss, lr_scale, query_x, query_y,
                 first_order, reduction, checkpoint, backend, queries_name="query_x")
    if call.backend == "reference":
        if loss == "ce":
            _checks.check_label_range("y", call.y, call.weights[-1].shape[-1])
            _checks.check_label_range("query_y", call.query_y, call.weights[-1].shape[-1])
        return reference.fast_weight_mlp_meta_loss(
            call.weights, call.biases, call.x, call.y, call.lr, call.queries, call.query_y,
            steps=call.steps, activation=activation, loss=loss, lr_scale=call.lr_scale,
            first_order=first_order, reduction=reduction)
    return _run(call, first_order, REDUCTIONS.index(reduction))[1]


# --- checks and plan ---------------------------------------------------------------------------

class _Call:
    """The checked, normalised arguments of one call and how it runs."""

    __slots__ = ("weights", "biases", "x", "y", "lr", "lr_scale", "queries", "query_y", "steps",
                 "activation", "loss", "stride", "backend")


def _layer_list(name: str, value, layers: int | None) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors (one per layer), got "
                        f"{type(value).__name__}")
    if layers is not None and len(value) != layers:
        raise ValueError(f"{name} has {len(value)} tensors but weights has {layers} layers; "
                         "give one per layer")
    for index, tensor in enumerate(value):
        _checks.require_tensor(f"{name}[{index}]", tensor)
    return list(value)


def _renamed(error: ValueError) -> ValueError:
    """An error of the linear op's checks, its ``weight`` read as this op's ``weights[0]``."""
    return ValueError(re.sub(r"\bweight\b", "weights[0]", str(error)))


def _plan(weights, biases, x, y, lr, steps, activation, loss, lr_scale, queries, query_y,
          first_order, reduction, checkpoint, backend, *, queries_name: str) -> _Call:
    """Checks every argument (docs/ops/fast_weight_mlp.md, "Bad input"; each message names the
    argument); returns them normalised, with the backend and the stride of the kept states."""
    weights = _layer_list("weights", weights, None)
    if not weights:
        raise ValueError("weights is empty; give at least one layer [d_0, d_1]")
    layers = len(weights)
    biases = None if biases is None else _layer_list("biases", biases, layers)
    lr_scale = None if lr_scale is None else _layer_list("lr_scale", lr_scale, layers)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {ACTIVATIONS}, got "
                        f"{type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if checkpoint is not None and not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be None, True or False, got {type(checkpoint).__name__}")
    _checks.require_tensor("x", x)
    first = weights[0]
    try:
        dtype = _checks.check_float_dtype(first, backend)
    except ValueError as error:
        raise _renamed(error) from None
    device = first.device
    if x.dim() not in (3, 4):
        raise ValueError(f"x has shape {_checks.shape_str(x.shape)}, expected [B, n, d_0] "
                         "(with steps=T) or [B, T, n, d_0]")
    tasks = x.shape[0]
    widths = [x.shape[-1]]
    for index, weight in enumerate(weights):
        name = f"weights[{index}]"
        if weight.dim() not in (2, 3) or weight.shape[-2] != widths[-1] or (
                weight.dim() == 3 and weight.shape[0] != tasks) or weight.shape[-1] < 1:
            what = "x's d_0" if index == 0 else f"weights[{index - 1}]'s last size"
            raise ValueError(
                f"{name} has shape {_checks.shape_str(weight.shape)}, expected "
                f"[{widths[-1]}, d_{index + 1}] or [{tasks}, {widths[-1]}, d_{index + 1}] "
                f"(d_{index} = {widths[-1]} is {what}: the layers' widths must chain)")
        _checks.check_same_dtype(name, weight, dtype)
        _checks.check_device(name, weight, device)
        widths.append(weight.shape[-1])
    for index in range(layers):
        d_in, d_out = widths[index], widths[index + 1]
        if biases is not None:
            _checks.check_shape(f"biases[{index}]", biases[index], (d_out,), (tasks, d_out))
            _checks.check_same_dtype(f"biases[{index}]", biases[index], dtype)
            _checks.check_device(f"biases[{index}]", biases[index], device)
        if lr_scale is not None:
            _checks.check_shape(f"lr_scale[{index}]", lr_scale[index], (d_in, d_out))
            _checks.check_same_dtype(f"lr_scale[{index}]", lr_scale[index], dtype)
            _checks.check_device(f"lr_scale[{index}]", lr_scale[index], device)
    # x, y, lr, steps, loss, first_order and the readout queries: the linear op's checks, on a
    # stand-in weight [d_0, d_L] (no memory: stride 0).
    stand_in = first.new_empty(1).as_strided((widths[0], widths[-1]), (0, 0))
    form_b_queries = queries if queries is not None and queries.dim() == 4 else None
    if query_y is not None:
        _checked_query_x(queries, x, _checks.check_steps("x", x, steps))
    try:
        (_, x, y, lr, steps, _, _, _, readout_queries) = _check(
            stand_in, x, y, lr, steps, loss, None, None, None,
            form_b_queries if query_y is not None else queries, first_order, backend)
    except ValueError as error:
        raise _renamed(error) from None
    if query_y is not None:
        query_y = _checked_query_y(query_y, queries, stand_in, loss)
        _checks.check_same_dtype(queries_name, queries, dtype)
        if loss == "mse":
            _checks.check_same_dtype("query_y", query_y, dtype)
        _checks.check_device(queries_name, queries, device)
        _checks.check_device("query_y", query_y, device)
    else:
        queries = readout_queries

    call = _Call()
    call.x, call.y, call.lr, call.steps = x, y, lr, steps
    call.queries, call.query_y = queries, query_y
    call.activation, call.loss = activation, loss
    call.backend = _choose_backend(backend, device, dtype, widths, x.shape[-2],
                                   0 if queries is None else queries.shape[-2])
    if call.backend == "reference":
        call.weights, call.biases, call.lr_scale = weights, biases, lr_scale
        call.stride = 0
        return call
    # Per task and dense, as the kernels read them; the expansion's backward sums shared layers.
    call.weights = [w.expand(tasks, w.shape[-2], w.shape[-1]).contiguous() for w in weights]
    call.biases = (None if biases is None
                   else [b.expand(tasks, b.shape[-1]).contiguous() for b in biases])
    call.lr_scale = None if lr_scale is None else [s.contiguous() for s in lr_scale]
    call.lr = lr.contiguous()
    call.x, call.y = x.contiguous(), y.contiguous()
    if queries is not None:
        call.queries = queries.contiguous()
    if query_y is not None:
        call.query_y = query_y.contiguous()
    differentiable = [*weights, *(biases or ()), *(lr_scale or ()), lr, x, y, queries, query_y]
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in differentiable)
    call.stride = 0
    if recording:
        params = sum(a * b + (b if biases is not None else 0)
                     for a, b in zip(widths[:-1], widths[1:]))
        itemsize = torch.finfo(state_dtype(dtype)).bits // 8
        if checkpoint is None:
            checkpoint = tasks * steps * params * itemsize > CHECKPOINT_BYTES
        call.stride = checkpoint_segment(steps) if checkpoint else 1
    return call


def _choose_backend(backend, device, dtype, widths, support, query_rows) -> str:
    """The backend that runs: the resolved one if its kernel module has the MLP functions and
    runs these sizes; under ``"auto"`` the reference otherwise, else a RuntimeError saying why."""
    which = _backends.resolve(backend, device, dtype)
    if which == "reference":
        return which
    reason = _mlp_unsupported(which, tuple(widths), support, query_rows)
    if not reason:
        return which
    if backend == "auto":
        return "reference"
    raise RuntimeError(f"backend {which!r} cannot run fast_weight_mlp with widths {widths}: "
                       f"{reason}; pass backend='reference' (or 'cpu' on CPU tensors)")


@torch.compiler.assume_constant_result
def _mlp_unsupported(which: str, widths: tuple, support: int, query_rows: int) -> str:
    """Why the kernel module of ``which`` cannot run these sizes ('' when it can); a constant
    for torch.compile."""
    module = _backends.kernels(which)
    if not hasattr(module, "mlp_forward"):
        return "its kernels have no MLP functions in this build"
    probe = getattr(module, "mlp_unsupported_reason", None)
    return (probe(list(widths), support, query_rows) if probe is not None else None) or ""


# --- running the custom ops --------------------------------------------------------------------

def _run(call: _Call, first_order: bool, reduction: int) -> list:
    """The forward op's outputs: ``[losses, out, states, *weights_T, *biases_T]``."""
    biases = call.biases or []
    lr_scale = call.lr_scale or []
    args = (call.weights, biases, call.x, call.y, call.lr, lr_scale, call.queries, call.query_y,
            ACTIVATIONS.index(call.activation), LOSS_CODES[call.loss], first_order, call.stride,
            reduction, call.backend)
    if _plain_eager(call.x, call.y, call.lr, call.queries, call.query_y, *call.weights,
                            *biases, *lr_scale):
        layers, has_bias, has_scale = len(call.weights), bool(biases), bool(lr_scale)
        return list(_EagerMLP.apply(layers, has_bias, has_scale, args[8:], call.x, call.y,
                                    call.lr, call.queries, call.query_y, *call.weights, *biases,
                                    *lr_scale))
    return list(torch.ops.metakernels.fast_weight_mlp_fwd(*args))


def _forward_kernels(weights, biases, x, y, lr, lr_scale, queries, query_y, activation, loss,
                     stride, reduction, backend) -> list:
    if loss == LOSS_CODES["ce"]:
        _checks.check_label_range("y", y, weights[-1].shape[-1])
        if query_y is not None:
            _checks.check_label_range("query_y", query_y, weights[-1].shape[-1])
    out = list(_backends.kernels(backend).mlp_forward(
        weights, biases, x, y, lr, lr_scale, queries, query_y, activation, loss, stride))
    if query_y is not None:
        out[1] = reduce_tasks(out[1], REDUCTIONS[reduction])
    return out


@torch.library.custom_op("metakernels::fast_weight_mlp_fwd", mutates_args=())
def _mlp_fwd(weights: list[Tensor], biases: list[Tensor], x: Tensor, y: Tensor, lr: Tensor,
             lr_scale: list[Tensor], queries: Optional[Tensor], query_y: Optional[Tensor],
             activation: int, loss: int, first_order: bool, stride: int, reduction: int,
             backend: str) -> list[Tensor]:
    """``[losses, out (readout / meta-loss / [0]), states, *weights_T, *biases_T]``."""
    return _forward_kernels(weights, biases, x, y, lr, lr_scale, queries, query_y, activation,
                            loss, stride, reduction, backend)


@_mlp_fwd.register_fake
def _mlp_fwd_fake(weights, biases, x, y, lr, lr_scale, queries, query_y, activation, loss,
                  first_order, stride, reduction, backend):
    tasks, steps = lr.shape
    first = weights[0]
    if query_y is not None:
        out = first.new_empty(tasks) if REDUCTIONS[reduction] == "none" else first.new_empty(())
    elif queries is not None:
        out = first.new_empty(tasks, steps, queries.shape[-2], weights[-1].shape[-1])
    else:
        out = first.new_empty(0)
    params = sum(w.shape[-2] * w.shape[-1] for w in weights) + sum(b.shape[-1] for b in biases)
    kept = -(-steps // stride) if stride > 0 else 0
    states = (first.new_empty(tasks, kept, params, dtype=state_dtype(first.dtype))
              if stride > 0 else first.new_empty(0))
    return ([first.new_empty(tasks, steps), out, states]
            + [w.new_empty(w.shape) for w in weights] + [b.new_empty(b.shape) for b in biases])


def _wanted(inputs: dict, first_order: bool, loss: int) -> list[bool]:
    """Which of (weights, biases, x, y, lr, lr_scale, queries, query_y) get a gradient."""
    mse = loss == LOSS_CODES["mse"]
    needs = lambda ts: any(t is not None and t.requires_grad for t in ts)  # noqa: E731
    return [needs(inputs["weights"]), needs(inputs["biases"]),
            needs([inputs["x"]]) and not first_order,
            needs([inputs["y"]]) and not first_order and mse,
            needs([inputs["lr"]]), needs(inputs["lr_scale"]), needs([inputs["queries"]]),
            needs([inputs["query_y"]]) and mse]


def _setup(ctx, weights, biases, x, y, lr, lr_scale, queries, query_y, config, output):
    activation, loss, first_order, stride, reduction, backend = config
    layers = len(weights)
    losses, out, states = output[0], output[1], output[2]
    weights_t = list(output[3:3 + layers])
    biases_t = list(output[3 + layers:])
    ctx.layers, ctx.n_bias, ctx.n_scale = layers, len(biases), len(lr_scale)
    ctx.config = config
    ctx.meta_loss = query_y is not None
    ctx.wanted = _wanted(dict(weights=weights, biases=biases, x=x, y=y, lr=lr,
                              lr_scale=lr_scale, queries=queries, query_y=query_y),
                         first_order, loss)
    ctx.save_for_backward(x, y, lr, queries, query_y, states, *weights, *biases, *lr_scale,
                          *weights_t, *biases_t)
    non_diff = [losses, states]
    if ctx.meta_loss:
        non_diff += weights_t + biases_t
    ctx.mark_non_differentiable(*non_diff)
    ctx.set_materialize_grads(False)


def _saved(ctx):
    saved = ctx.saved_tensors
    x, y, lr, queries, query_y, states = saved[:6]
    rest = list(saved[6:])
    layers, n_bias, n_scale = ctx.layers, ctx.n_bias, ctx.n_scale
    weights, rest = rest[:layers], rest[layers:]
    biases, rest = rest[:n_bias], rest[n_bias:]
    lr_scale, rest = rest[:n_scale], rest[n_scale:]
    weights_t, biases_t = rest[:layers], rest[layers:]
    return x, y, lr, queries, query_y, states, weights, biases, lr_scale, weights_t, biases_t


def _grads(ctx, grad_out, grad_weights_t, grad_biases_t, direct: bool):
    """The backward kernels' gradients ``[gx, gy, glr, gq, gqy, *gw, *gb, *gs]``, or None when
    nothing is wanted."""
    (x, y, lr, queries, query_y, states, weights, biases, lr_scale, weights_t,
     biases_t) = _saved(ctx)
    activation, loss, first_order, stride, reduction, backend = ctx.config
    wanted = ctx.wanted
    if not any(wanted):
        return None
    if ctx.meta_loss:
        if grad_out is None:  # the meta-loss is the only differentiable output
            return None
        grad_out = _task_grads(grad_out, lr.shape[0], REDUCTIONS[reduction])
        grad_weights_t, grad_biases_t = [], []
    else:
        if all(g is None for g in grad_weights_t + grad_biases_t):
            grad_weights_t, grad_biases_t = [], []
        else:
            grad_weights_t = [torch.zeros_like(w) if g is None else g
                              for g, w in zip(grad_weights_t, weights_t)]
            grad_biases_t = [torch.zeros_like(b) if g is None else g
                             for g, b in zip(grad_biases_t, biases_t)]
        if queries is None:
            grad_out = None
    args = (weights, biases, x, y, lr, lr_scale, queries, query_y, states, weights_t, biases_t,
            grad_weights_t, grad_biases_t, grad_out, activation, loss, stride, first_order,
            wanted)
    if direct:
        return list(_backends.kernels(backend).mlp_backward(*args))
    return list(torch.ops.metakernels.fast_weight_mlp_bwd(*args, backend))


def _none_unless(grad, want):
    return grad if want else None


def _split_grads(ctx, grads):
    """(grad weights list, biases list, x, y, lr, lr_scale list, queries, query_y)."""
    layers, n_bias, n_scale = ctx.layers, ctx.n_bias, ctx.n_scale
    wanted = ctx.wanted
    if grads is None:
        return ([None] * layers, [None] * n_bias, None, None, None, [None] * n_scale, None, None)
    gx, gy, glr, gq, gqy = grads[:5]
    gw = grads[5:5 + layers]
    gb = grads[5 + layers:5 + 2 * layers]
    gs = grads[5 + 2 * layers:5 + 3 * layers]
    return ([_none_unless(g, wanted[0]) for g in gw],
            [_none_unless(g, wanted[1]) for g in gb[:n_bias]],
            _none_unless(gx, wanted[2]), _none_unless(gy, wanted[3]),
            _none_unless(glr, wanted[4]),
            [_none_unless(g, wanted[5]) for g in gs[:n_scale]],
            _none_unless(gq, wanted[6]), _none_unless(gqy, wanted[7]))


def _mlp_setup_context(ctx, inputs, output):
    (weights, biases, x, y, lr, lr_scale, queries, query_y, activation, loss, first_order,
     stride, reduction, backend) = inputs
    _setup(ctx, weights, biases, x, y, lr, lr_scale, queries, query_y,
           (activation, loss, first_order, stride, reduction, backend), output)


def _mlp_backward(ctx, grads_out):
    layers = ctx.layers
    grad_out = grads_out[1]
    grads = _grads(ctx, grad_out, list(grads_out[3:3 + layers]), list(grads_out[3 + layers:]),
                   direct=False)
    gw, gb, gx, gy, glr, gs, gq, gqy = _split_grads(ctx, grads)
    return (gw, gb, gx, gy, glr, gs, gq, gqy) + (None,) * 6


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


@torch.library.custom_op("metakernels::fast_weight_mlp_bwd", mutates_args=())
def _mlp_bwd(weights: list[Tensor], biases: list[Tensor], x: Tensor, y: Tensor, lr: Tensor,
             lr_scale: list[Tensor], queries: Optional[Tensor], query_y: Optional[Tensor],
             states: Tensor, weights_t: list[Tensor], biases_t: list[Tensor],
             grad_weights_t: list[Tensor], grad_biases_t: list[Tensor],
             grad_out: Optional[Tensor], activation: int, loss: int, stride: int,
             first_order: bool, wanted: list[bool], backend: str) -> list[Tensor]:
    """``[gx, gy, glr, gq, gqy, *gw, *gb, *gs]``, each an empty tensor where not wanted."""
    return list(_backends.kernels(backend).mlp_backward(
        weights, biases, x, y, lr, lr_scale, queries, query_y, states, weights_t, biases_t,
        grad_weights_t, grad_biases_t, grad_out, activation, loss, stride, first_order, wanted))


@_mlp_bwd.register_fake
def _mlp_bwd_fake(weights, biases, x, y, lr, lr_scale, queries, query_y, states, weights_t,
                  biases_t, grad_weights_t, grad_biases_t, grad_out, activation, loss, stride,
                  first_order, wanted, backend):
    first = weights[0]
    empty = first.new_empty(0)
    like = lambda t, want: t.new_empty(t.shape, dtype=first.dtype) if want and t is not None \
        else empty  # noqa: E731
    mse = loss == LOSS_CODES["mse"]
    out = [like(x, wanted[2]), like(y, wanted[3] and mse), like(lr, wanted[4]),
           like(queries, wanted[6]), like(query_y, wanted[7] and mse)]
    out += [like(w, wanted[0]) for w in weights]
    layers = len(weights)
    out += [like(b, wanted[1]) for b in biases] + [empty] * (layers - len(biases))
    out += [like(s, wanted[5]) for s in lr_scale] + [empty] * (layers - len(lr_scale))
    return out


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "metakernels: the backward of fast_weight_mlp_unroll / fast_weight_mlp_meta_loss (a fused "
        "kernel computing the exact second-order meta-gradient) cannot be differentiated again: "
        "double backward is not supported; use backend='reference' for higher-order derivatives.")


_mlp_bwd.register_autograd(_no_double_backward)


class _EagerMLP(torch.autograd.Function):
    """fast_weight_mlp_fwd with its registered autograd, for plain eager calls; the tensors come
    flat (an autograd.Function tracks tensor arguments only): x, y, lr, queries, query_y, then
    the layers' weights, biases and lr_scale."""

    @staticmethod
    def forward(ctx, layers, n_bias_flag, n_scale_flag, config, x, y, lr, queries, query_y,
                *layer_tensors):
        weights = list(layer_tensors[:layers])
        rest = layer_tensors[layers:]
        biases = list(rest[:layers]) if n_bias_flag else []
        rest = rest[layers:] if n_bias_flag else rest
        lr_scale = list(rest[:layers]) if n_scale_flag else []
        activation, loss, first_order, stride, reduction, backend = config
        output = _forward_kernels(weights, biases, x, y, lr, lr_scale, queries, query_y,
                                  activation, loss, stride, reduction, backend)
        _setup(ctx, weights, biases, x, y, lr, lr_scale, queries, query_y, config, output)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads_out):
        layers = ctx.layers
        # Under create_graph the backward op runs, whose own backward raises (double backward).
        grads = _grads(ctx, grads_out[1], list(grads_out[3:3 + layers]),
                       list(grads_out[3 + layers:]), direct=not torch.is_grad_enabled())
        gw, gb, gx, gy, glr, gs, gq, gqy = _split_grads(ctx, grads)
        return (None, None, None, None, gx, gy, glr, gq, gqy, *gw, *gb, *gs)
