"""``FastWeightMLP``: a perceptron whose every layer adapts to each task through
:func:`metakernels.fast_weight_mlp_unroll` (MAML on a whole network, TTT-MLP fast weights): the
counterpart of :class:`FastWeightLinear` for L layers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metakernels.nn.fast_weight_linear import inner_steps
from metakernels.ops import _checks
from metakernels.ops.fast_weight_mlp import fast_weight_mlp_meta_loss, fast_weight_mlp_unroll
from metakernels.reference.fast_weight_mlp import (ACTIVATIONS, MLPUnrollOutput, activate,
                                                   mlp_apply)


class FastWeightMLP(nn.Module):
    """An MLP ``d_0 → d_1 → … → d_L`` with a meta-learned init θ_0 that adapts per task.

    Args:
        widths: ``[d_0, …, d_L]``, at least two.
        steps: T, the inner steps :meth:`adapt` takes by default (and the length of the
            per-step learning rates).
        inner_lr: the inner learning rate η.
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"silu"`` (between layers).
        loss: the inner loss, ``"mse"`` or ``"ce"``.
        bias: whether the layers have biases.
        learn_lr: MAML++: per-step learning rates ``inner_lr [T]`` are meta-learned.
        meta_sgd: Meta-SGD: a meta-learned elementwise ``lr_scale`` per weight matrix.
        first_order: the default of :meth:`adapt`'s ``first_order`` (FOMAML).
        backend: the op's backend.

    Layer l is stored as ``weights[l] [d_l, d_{l+1}]`` (the op's layout), initialised as
    ``nn.Linear``'s.
    """

    def __init__(self, widths, *, steps: int = 1, inner_lr: float = 0.01,
                 activation: str = "relu", loss: str = "mse", bias: bool = True,
                 learn_lr: bool = False, meta_sgd: bool = False, first_order: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        widths = list(widths)
        if len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                  for w in widths):
            raise ValueError(f"widths must be at least two positive ints, got {widths}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        _checks.check_loss(loss)
        if not math.isfinite(inner_lr) or inner_lr <= 0:
            raise ValueError(f"inner_lr must be a positive number, got {inner_lr!r}")
        self.widths, self.steps, self.activation, self.loss = widths, steps, activation, loss
        self.first_order, self.backend = first_order, backend
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList() if bias else None
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            bound = d_in ** -0.5
            self.weights.append(nn.Parameter(torch.empty(d_in, d_out).uniform_(-bound, bound)))
            if bias:
                self.biases.append(nn.Parameter(torch.empty(d_out).uniform_(-bound, bound)))
        lrs = torch.full((steps,), float(inner_lr))
        if learn_lr:
            self.inner_lr = nn.Parameter(lrs)
        else:
            self.register_buffer("inner_lr", lrs)
        self.lr_scale = (nn.ParameterList(nn.Parameter(torch.ones(a, b))
                                          for a, b in zip(widths[:-1], widths[1:]))
                         if meta_sgd else None)

    def extra_repr(self) -> str:
        return (f"widths={self.widths}, steps={self.steps}, activation={self.activation!r}, "
                f"loss={self.loss!r}, bias={self.biases is not None}, "
                f"meta_sgd={self.lr_scale is not None}")

    def _common(self, support_x, steps, first_order):
        total = inner_steps(support_x, steps, self.steps, "module")
        return dict(steps=None if support_x.dim() == 4 else total, activation=self.activation,
                    loss=self.loss, lr_scale=None if self.lr_scale is None else list(self.lr_scale),
                    first_order=self.first_order if first_order is None else first_order,
                    backend=self.backend), self.inner_lr[:total]

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None, checkpoint: bool | None = None) -> MLPUnrollOutput:
        """T SGD steps on every layer for every task (:func:`metakernels.fast_weight_mlp_unroll`):
        ``support_x [B, n, d_0]`` (with the default or given ``steps``) or ``[B, T, n, d_0]``."""
        options, lr = self._common(support_x, steps, first_order)
        return fast_weight_mlp_unroll(list(self.weights), self._biases(), support_x, support_y,
                                      lr, checkpoint=checkpoint, **options)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  steps: int | None = None, *, first_order: bool | None = None,
                  reduction: str = "mean", checkpoint: bool | None = None) -> Tensor:
        """The meta-loss of :meth:`adapt` then the query loss, in one fused op
        (:func:`metakernels.fast_weight_mlp_meta_loss`): ``query_x [B, m, d_0]`` (the loss at
        θ_T) or ``[B, T, m, d_0]`` (the readout loss after every step)."""
        options, lr = self._common(support_x, steps, first_order)
        return fast_weight_mlp_meta_loss(list(self.weights), self._biases(), support_x,
                                         support_y, lr, query_x, query_y, reduction=reduction,
                                         checkpoint=checkpoint, **options)

    def _biases(self):
        return None if self.biases is None else list(self.biases)

    def forward(self, x: Tensor, adapted: MLPUnrollOutput | None = None) -> Tensor:
        """The network with the init (``x [..., d_0]``) or with every task's adapted layers
        (``adapted`` from :meth:`adapt`, ``x [B, rows, d_0]``)."""
        if adapted is None:
            hidden = x
            for l, weight in enumerate(self.weights):
                hidden = hidden @ weight
                if self.biases is not None:
                    hidden = hidden + self.biases[l]
                if l + 1 < len(self.weights):
                    hidden = activate(hidden, self.activation)
            return hidden
        if x.dim() != 3 or x.shape[0] != adapted.weights[0].shape[0]:
            raise ValueError(f"x has shape {list(x.shape)}; with adapted layers expected "
                             f"[B, rows, d_0] with B = {adapted.weights[0].shape[0]}")
        return mlp_apply(adapted.weights, adapted.biases, x, self.activation)

