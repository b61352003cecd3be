"""``FastWeightLinear``: a linear layer whose weights adapt to each task through
:func:`metakernels.fast_weight_unroll` (the head of MAML, ANIL, Meta-SGD, MAML++)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metakernels.ops import UnrollOutput, _checks, fast_weight_meta_loss, fast_weight_unroll


class FastWeightLinear(nn.Module):
    """A linear model ``x W + 1 bᵀ`` with a meta-learned init ``(W_0, b_0)`` that adapts per task.

    Args:
        in_features, out_features: d_in, d_out.
        steps: T, the number of inner steps :meth:`adapt` takes by default (and the length of the
            per-step learning rates).
        inner_lr: the inner learning rate η (the same for every step at the start).
        loss: the inner loss, ``"mse"`` (½‖z − y‖² averaged over the rows) or ``"ce"``.
        bias: whether the model has a bias b.
        learn_lr: MAML++: the per-step learning rates ``inner_lr [T]`` are meta-learned
            parameters; otherwise a buffer.
        meta_sgd: Meta-SGD: a meta-learned elementwise ``lr_scale [d_in, d_out]`` (and
            ``bias_lr_scale [d_out]``) multiplies every inner step.
        first_order: the default of :meth:`adapt`'s ``first_order`` (FOMAML).
        backend: the op's backend (``"auto"``: the fastest for the device and dtype).

    The init is ``nn.Linear``'s, stored transposed as ``weight [d_in, d_out]`` (the op's layout).
    """

    def __init__(self, in_features: int, out_features: int, *, steps: int = 1,
                 inner_lr: float = 0.01, loss: str = "mse", bias: bool = True,
                 learn_lr: bool = False, meta_sgd: bool = False, first_order: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if loss not in ("mse", "ce"):
            raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
        if not math.isfinite(inner_lr) or inner_lr <= 0:
            raise ValueError(f"inner_lr must be a positive number, got {inner_lr!r}")
        self.in_features, self.out_features, self.steps = in_features, out_features, steps
        self.loss, self.first_order, self.backend = loss, first_order, backend
        bound = in_features ** -0.5
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = (nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
                     if bias else None)
        lrs = torch.full((steps,), float(inner_lr))
        if learn_lr:
            self.inner_lr = nn.Parameter(lrs)
        else:
            self.register_buffer("inner_lr", lrs)
        self.lr_scale = nn.Parameter(torch.ones(in_features, out_features)) if meta_sgd else None
        self.bias_lr_scale = (nn.Parameter(torch.ones(out_features)) if meta_sgd and bias
                              else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"steps={self.steps}, loss={self.loss!r}, bias={self.bias is not None}, "
                f"learn_lr={isinstance(self.inner_lr, nn.Parameter)}, "
                f"meta_sgd={self.lr_scale is not None}")

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None) -> UnrollOutput:
        """Adapts the init to every task: T steps of gradient descent on the support set.

        Args:
            support_x: ``[B, n, d_in]`` (the same support set every step) or ``[B, T, n, d_in]``
                (one batch per step, e.g. a trajectory's chunks).
            support_y: mse: ``[B, n, d_out]`` / ``[B, T, n, d_out]`` floats; ce: int64 labels
                ``[B, n]`` / ``[B, T, n]``.
            steps: T for 3-D ``support_x`` (default: the layer's ``steps``, at most that many);
                leave None for 4-D.
            first_order: FOMAML (default: the layer's ``first_order``).

        Returns:
            :class:`metakernels.UnrollOutput`: ``weight [B, d_in, d_out]``, ``bias [B, d_out]``
            (or None), the inner ``losses [B, T]``. Its backward is the exact meta-gradient.
        """
        total = self._steps(support_x, steps)
        return fast_weight_unroll(
            self.weight, support_x, support_y, self.inner_lr[:total],
            steps=None if support_x.dim() == 4 else total, loss=self.loss, bias=self.bias,
            lr_scale=self.lr_scale, bias_lr_scale=self.bias_lr_scale,
            first_order=self.first_order if first_order is None else first_order,
            backend=self.backend)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  steps: int | None = None, *, first_order: bool | None = None,
                  reduction: str = "mean", checkpoint: bool | None = None) -> Tensor:
        """The meta-loss of :meth:`adapt` followed by the query loss, in one fused op
        (:func:`metakernels.fast_weight_meta_loss`): MAML's outer loss on the query set of every
        task, with the exact meta-gradient as its backward, no adapted weights materialised.

        Args:
            support_x, support_y, steps, first_order: as in :meth:`adapt`.
            query_x: ``[B, m, d_in]`` (the loss of the adapted layer) or ``[B, T, m, d_in]``
                (the readout loss after every step, summed over steps).
            query_y: mse targets ``[..., m, d_out]``, or ce labels ``[..., m]``.
            reduction: ``"mean"`` over tasks, ``"sum"`` or ``"none"`` (``[B]``).
            checkpoint: as in :func:`metakernels.fast_weight_meta_loss`.

        The query loss is the layer's loss averaged over the m rows: mse ``½‖z − y‖²`` per row
        (PyTorch's ``mse_loss`` over rows and outputs is this times 2/d_out), ce the mean
        cross-entropy.
        """
        total = self._steps(support_x, steps)
        return fast_weight_meta_loss(
            self.weight, support_x, support_y, self.inner_lr[:total], query_x, query_y,
            steps=None if support_x.dim() == 4 else total, loss=self.loss, bias=self.bias,
            lr_scale=self.lr_scale, bias_lr_scale=self.bias_lr_scale,
            first_order=self.first_order if first_order is None else first_order,
            reduction=reduction, checkpoint=checkpoint, backend=self.backend)

    def _steps(self, support_x: Tensor, steps: int | None) -> int:
        """T for a call of adapt or meta_loss, checked against the layer's learning rates."""
        return inner_steps(support_x, steps, self.steps, "layer")

    def forward(self, x: Tensor, weight: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
        """``x W + 1 bᵀ`` with the init, or with every task's adapted weights.

        Args:
            x: ``[..., d_in]`` with the init; ``[B, rows, d_in]`` with adapted weights.
            weight: None (the init), or ``[B, d_in, d_out]`` from :meth:`adapt`.
            bias: ``[B, d_out]`` from :meth:`adapt` (None when the layer has no bias).

        Returns:
            ``[..., d_out]``, or ``[B, rows, d_out]`` with adapted weights.
        """
        if weight is None:
            if bias is not None:
                raise ValueError("bias was given without weight; pass both from adapt()")
            out = x @ self.weight
            return out if self.bias is None else out + self.bias
        if weight.dim() != 3 or x.dim() != 3 or x.shape[0] != weight.shape[0] \
                or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"x has shape {list(x.shape)} and weight {list(weight.shape)}; "
                             "expected x [B, rows, d_in] and weight [B, d_in, d_out]")
        if (bias is None) != (self.bias is None):
            raise ValueError("bias must be given exactly when the layer has a bias")
        out = torch.bmm(x, weight)
        return out if bias is None else out + bias.unsqueeze(1)


def inner_steps(support_x: Tensor, steps: int | None, available: int, owner: str) -> int:
    """T for an adapting module's call: ``steps`` (default ``available``) with 3-D
    ``support_x``, its T with 4-D; at most ``available``, the per-step learning rates the
    ``owner`` ("layer", "module") holds."""
    if not isinstance(support_x, Tensor):
        raise TypeError(f"support_x must be a tensor, got {type(support_x).__name__}")
    total = _checks.check_steps(
        "support_x", support_x, available if steps is None and support_x.dim() != 4 else steps)
    if total > available:
        raise ValueError(f"the {owner} has learning rates for {available} steps, asked for "
                         f"{total}: build it with steps={total}")
    return total
