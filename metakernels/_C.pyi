"""Typed stub of the compiled module (csrc/torch/binding.cpp): the eager CPU bodies of the
metakernels:: custom ops. Call the ops through metakernels.fast_weight_unroll / linear_hvp."""

from torch import Tensor

def unroll_forward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                   lr_scale: Tensor | None, bias_lr_scale: Tensor | None, queries: Tensor | None,
                   loss: int, store_states: bool) -> list[Tensor]: ...
def unroll_backward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                    lr_scale: Tensor | None, bias_lr_scale: Tensor | None,
                    queries: Tensor | None, residual: Tensor, states: Tensor,
                    weight_final: Tensor, grad_weight_final: Tensor,
                    grad_bias_final: Tensor | None, grad_readout: Tensor | None, loss: int,
                    first_order: bool, wanted: list[bool]) -> list[Tensor]: ...
def linear_hvp(weight: Tensor, x: Tensor, v: Tensor, bias: Tensor | None, v_bias: Tensor | None,
               loss: int, with_bias: bool) -> list[Tensor]: ...
def unroll_path(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                lr_scale: Tensor | None, bias_lr_scale: Tensor | None, queries: Tensor | None,
                loss: int, store_states: bool, grad_bias_lr_scale: bool,
                wants_states: bool) -> str: ...
def set_poison_outputs(poison: bool) -> None: ...
def meta_loss_forward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                      lr_scale: Tensor | None, bias_lr_scale: Tensor | None, query_x: Tensor,
                      query_y: Tensor, loss: int, store_states: bool, keep_weight: bool,
                      grad_bias_lr_scale: bool) -> list[Tensor]: ...
def meta_loss_backward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor,
                       bias: Tensor | None, lr_scale: Tensor | None,
                       bias_lr_scale: Tensor | None, query_x: Tensor, query_y: Tensor,
                       residual: Tensor, states: Tensor, weight_final: Tensor,
                       query_residual: Tensor, grad_loss: Tensor, loss: int, first_order: bool,
                       wanted: list[bool], grad_weight_in: Tensor | None,
                       grad_bias_in: Tensor | None) -> list[Tensor]: ...
def meta_loss_path(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                   lr_scale: Tensor | None, bias_lr_scale: Tensor | None, query_x: Tensor,
                   loss: int, store_states: bool, keep_weight: bool,
                   grad_bias_lr_scale: bool) -> str: ...
def chunked_expected(steps: int, n: int, d_in: int, d_out: int, m: int,
                     wants_states: bool) -> bool: ...
def set_chunked_knobs(force: int, rows: int) -> None: ...

# --- MLP fast weights (docs/ops/fast_weight_mlp.md) ------------------------------------------------
# The backend-level interface of fast_weight_mlp_unroll / fast_weight_mlp_meta_loss: what
# metakernels/ops/fast_weight_mlp.py calls on a backend module from _backends.kernels(name). The
# Triton module (metakernels.triton) provides the same two functions with these signatures, plus
#     mlp_unsupported_reason(widths: list[int], n: int, m: int) -> str | None
# (widths = [d_0, ..., d_L], n support rows, m query rows or 0): None when it runs these sizes,
# else why not (the ops fall back under backend="auto" or raise it under backend="triton").
#
# What the ops normalise before the call (no kernel re-checks):
#   weights   L tensors [B, d_l, d_{l+1}], each expanded to per task and contiguous, one float
#             dtype (the inputs' dtype).
#   biases    L tensors [B, d_{l+1}] (expanded, contiguous), or [] without biases.
#   x         [B, n, d_0] (3-D: the same support set every step) or [B, T, n, d_0], contiguous.
#   targets   mse: x's leading shape + [d_L], the float dtype; ce: int64 labels [B, n] /
#             [B, T, n] in [0, d_L) (range checked by the ops).
#   lr        [B, T] contiguous, the float dtype. T = lr.shape[1].
#   lr_scale  L tensors [d_l, d_{l+1}] contiguous (Meta-SGD, weights only), or [].
#   queries   None; unroll mode: the readout queries [B, T, m, d_0]; meta-loss mode: query_x,
#             [B, m, d_0] (form A: loss at θ_T) or [B, T, m, d_0] (form B: loss of every readout).
#   query_y   None: unroll mode. A tensor: meta-loss mode, mse [B, m, d_L] / [B, T, m, d_L] float,
#             ce int64 [B, m] / [B, T, m].
#   activation  index in metakernels.reference.fast_weight_mlp.ACTIVATIONS:
#             0 relu, 1 tanh, 2 gelu (erf form), 3 silu; none after the last layer.
#   loss      metakernels._losses.LOSS_CODES: 0 mse, 1 ce.
#   stride    what the forward keeps for the backward: 0 nothing (no gradient recorded);
#             k >= 1 θ_t at t = 0, k, 2k, ... (k = 1: every step; the ops' checkpoint=True passes
#             ⌈√T⌉ and the backward recomputes each segment of k steps from its start).
# Differentiable: weights, biases, x, targets (mse), lr, lr_scale, queries, query_y (mse).

def mlp_forward(weights: list[Tensor], biases: list[Tensor], x: Tensor, targets: Tensor,
                lr: Tensor, lr_scale: list[Tensor], queries: Tensor | None,
                query_y: Tensor | None, activation: int, loss: int,
                stride: int) -> list[Tensor]:
    """T SGD steps on every layer for B tasks. Returns
    ``[losses, out, states, *weights_T, *biases_T]``:
      losses     [B, T] inner loss at θ_t before step t, in the inputs' dtype.
      out        unroll mode: readout [B, T, m, d_L] (queries given) or an empty tensor;
                 meta-loss mode: the per-task outer loss L [B] (form A: ℓ of the network at
                 θ_T on query_x; form B: Σ_t ℓ of the readout at θ_{t+1}); the ops reduce it.
      states     [B, S, P] in the state dtype (float32 for half inputs, else the inputs'), with
                 S = ⌈T/stride⌉ and P = Σ_l d_l d_{l+1} (+ Σ_l d_{l+1} with biases): θ_{s·stride}
                 packed per task as W_0 … W_{L−1} (row-major), then b_0 … b_{L−1}; an empty
                 tensor for stride 0.
      weights_T  L tensors [B, d_l, d_{l+1}]; biases_T L tensors [B, d_{l+1}] (none without
                 biases).
    """
    ...

def mlp_backward(weights: list[Tensor], biases: list[Tensor], x: Tensor, targets: Tensor,
                 lr: Tensor, lr_scale: list[Tensor], queries: Tensor | None,
                 query_y: Tensor | None, states: Tensor, weights_final: list[Tensor],
                 biases_final: list[Tensor], grad_weights_final: list[Tensor],
                 grad_biases_final: list[Tensor], grad_out: Tensor | None, activation: int,
                 loss: int, stride: int, first_order: bool, wanted: list[bool]) -> list[Tensor]:
    """The exact (second-order, or first-order with ``first_order``) gradients, reverse mode
    through the T steps from the forward's ``states`` (same ``stride``) and θ_T
    (``weights_final``, ``biases_final``).

    Upstream adjoints: ``grad_weights_final`` / ``grad_biases_final`` L tensors shaped like
    θ_T, or [] for zero; ``grad_out``: unroll mode the readout's adjoint [B, T, m, d_L] or None;
    meta-loss mode the per-task adjoint c [B] of L (the reduction's scale applied).
    ``wanted``: 8 flags for (weights, biases, x, targets, lr, lr_scale, queries, query_y).

    Returns ``[grad_x, grad_targets, grad_lr, grad_queries, grad_query_y, *grad_weights,
    *grad_biases, *grad_lr_scale]``: grad_x shaped like x (3-D x: summed over steps),
    grad_targets like targets, grad_lr [B, T], grad_queries / grad_query_y like them,
    grad_weights L tensors per task [B, d_l, d_{l+1}] (the ops sum shared layers over tasks),
    grad_biases L tensors [B, d_{l+1}], grad_lr_scale L tensors [d_l, d_{l+1}] summed over
    tasks. Where not wanted (or absent): an empty tensor, L of them for a list.
    """
    ...
