"""The meta-models of the trainer: a body (meta-learned by the outer loop) and a
:class:`~metakernels.nn.FastWeightLinear` head, adapted through the fused ops: the head alone
(``--adapt head``), or the whole network (``--adapt all``: body and head are one ReLU perceptron,
adapted by :func:`metakernels.fast_weight_mlp_unroll`). ``--adapt all-generic`` adapts the whole
network through a generic ``torch.func`` loop instead (for comparison; any body)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from metakernels._losses import mean_loss
from metakernels.nn import FastWeightLinear
from metakernels.ops.fast_weight_mlp import fast_weight_mlp_unroll
from metakernels.reference.fast_weight_mlp import mlp_apply
from metakernels.train.tasks.base import TaskBatch, query_losses


class Adapted(NamedTuple):
    """One inner loop over a batch of tasks.

    pred:         the adapted model's predictions on the query set ``[B, rows, d_out]``.
    inner_losses: ``[B, T]`` the inner loss before each step (detached), in the units of the
                  query loss (see :func:`inner_loss_units`).
    fast:         the adapted parameters of every task, ``{name: [B, ...]}``.
    """

    pred: Tensor
    inner_losses: Tensor
    fast: dict[str, Tensor]


def inner_loss_units(losses: Tensor, loss: str, d_out: int) -> Tensor:
    """The op's inner loss (mse: ½‖z − y‖² over the rows) in the query loss's units (the mean
    squared error over rows and outputs); ce is already the mean cross-entropy."""
    return losses * (2.0 / d_out) if loss == "mse" else losses


def _param_key(name: str) -> str:
    return name.replace(".", "__")   # ParameterDict keys cannot hold dots


class HeadModel(nn.Module):
    """``head(body(x))`` with a :class:`FastWeightLinear` head.

    Args:
        body: the feature network, ``[..., d_x] -> [..., d_features]``.
        head: the linear head that adapts per task.
        adapt: ``"head"`` (only the head adapts, through the fused op), ``"all"`` (every
            parameter adapts, through the fused MLP op where the body is a ReLU perceptron,
            else as ``"all-generic"``) or ``"all-generic"`` (through ``torch.func``).
        meta_sgd_all: with ``adapt="all"``, a meta-learned elementwise learning-rate scale per
            weight matrix (Meta-SGD over the whole network; the MLP op does not scale biases'
            steps, so neither path does).
    """

    def __init__(self, body: nn.Module, head: FastWeightLinear, *, adapt: str = "head",
                 meta_sgd_all: bool = False) -> None:
        super().__init__()
        self.body, self.head, self.adapt = body, head, adapt
        self.adapted_names = ([n for n, _ in body.named_parameters(prefix="body")]
                              + [n for n, _ in head.named_parameters(prefix="head")
                                 if n in ("head.weight", "head.bias")])
        if adapt != "head" and meta_sgd_all:
            params = dict(self.named_parameters())
            self.lr_scales = nn.ParameterDict({
                _param_key(n): nn.Parameter(torch.ones_like(params[n]))
                for n in self.adapted_names if n.endswith("weight")})
        else:
            self.lr_scales = None

    def forward(self, x: Tensor) -> Tensor:
        """The meta-init's prediction ``[..., d_out]``."""
        return self.head(self.body(x))

    def inner_loop(self, batch: TaskBatch, steps: int, first_order: bool) -> Adapted:
        """Adapts to every task of ``batch`` (``support_x``, ``support_y``, ``query_x``)."""
        if self.adapt == "all" and self._mlp_layers() is not None:
            return self._inner_loop_mlp(batch, steps, first_order)
        if self.adapt != "head":
            return self._inner_loop_all(batch, steps, first_order)
        support = self.body(batch["support_x"])
        query = self.body(batch["query_x"])
        out = self.head.adapt(support, batch["support_y"], steps, first_order=first_order)
        fast = {"head.weight": out.weight}
        if out.bias is not None:
            fast["head.bias"] = out.bias
        return Adapted(self.head(query, out.weight, out.bias),
                       inner_loss_units(out.losses, self.head.loss, self.head.out_features), fast)

    def _inner_loop_all(self, batch: TaskBatch, steps: int, first_order: bool) -> Adapted:
        """Full-network MAML: ``vmap`` over tasks of an unrolled loop whose inner gradient is
        ``torch.func.grad``; differentiable (second order unless ``first_order``)."""
        params = {n: p for n, p in self.named_parameters() if n in self.adapted_names}
        lrs = self.head.inner_lr[:steps]
        scales = (None if self.lr_scales is None
                  else {n: self.lr_scales[_param_key(n)] for n in params
                        if _param_key(n) in self.lr_scales})
        loss = self.head.loss

        def predict(fast, x):
            return torch.func.functional_call(self, fast, (x,))

        def inner_loss(fast, x, y):
            return mean_loss(predict(fast, x), y, loss)

        def one_task(support_x, support_y, query_x):
            fast, losses = params, []
            for t in range(steps):
                grads, value = torch.func.grad_and_value(inner_loss)(fast, support_x, support_y)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                if scales is not None:
                    grads = {n: scales[n] * g if n in scales else g for n, g in grads.items()}
                fast = {n: fast[n] - lrs[t] * grads[n] for n in fast}
                losses.append(value.detach())
            return predict(fast, query_x), torch.stack(losses), fast

        pred, losses, fast = torch.func.vmap(one_task)(
            batch["support_x"], batch["support_y"], batch["query_x"])
        return Adapted(pred, inner_loss_units(losses, loss, self.head.out_features), fast)

    def _mlp_layers(self) -> list[tuple[str, nn.Module]] | None:
        """The linear layers of body and head, in order, when the whole network is one ReLU
        perceptron (``Linear, ReLU, …, Linear, ReLU`` then the head), else None."""
        body = list(self.body.named_children()) if isinstance(self.body, nn.Sequential) else None
        if not body or len(body) % 2:
            return None
        layers = []
        for (name, linear), (_, act) in zip(body[0::2], body[1::2]):
            if type(linear) is not nn.Linear or type(act) is not nn.ReLU:
                return None
            layers.append((f"body.{name}", linear))
        return layers

    def _inner_loop_mlp(self, batch: TaskBatch, steps: int, first_order: bool) -> Adapted:
        """Full-network adaptation through :func:`metakernels.fast_weight_mlp_unroll`: every
        layer of body and head adapts inside the op (exact second order unless
        ``first_order``); the query prediction runs on the adapted layers in PyTorch."""
        layers = self._mlp_layers()
        head = self.head
        # nn.Linear keeps weight [d_out, d_in]; the op's layers are [d_in, d_out].
        weights = [linear.weight.t() for _, linear in layers] + [head.weight]
        biases = [linear.bias for _, linear in layers] + [head.bias]
        if any(b is None for b in biases):
            biases = None
        names = [name for name, _ in layers] + ["head"]
        lr_scale = None
        if self.lr_scales is not None:
            lr_scale = [self.lr_scales[_param_key(f"{name}.weight")] for name in names]
            lr_scale = [s.t() if name != "head" else s for s, name in zip(lr_scale, names)]
        out = fast_weight_mlp_unroll(
            weights, biases, batch["support_x"], batch["support_y"], head.inner_lr[:steps],
            steps=steps, activation="relu", loss=head.loss, lr_scale=lr_scale,
            first_order=first_order, backend=head.backend)
        pred = mlp_apply(out.weights, out.biases, batch["query_x"], "relu")
        fast = {}
        for index, name in enumerate(names):
            weight = out.weights[index]
            fast[f"{name}.weight"] = weight if name == "head" else weight.transpose(1, 2)
            if out.biases is not None:
                fast[f"{name}.bias"] = out.biases[index]
        return Adapted(pred, inner_loss_units(out.losses, head.loss, head.out_features), fast)

    def meta_losses(self, batch: TaskBatch, steps: int,
                    first_order: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """The head-only meta-step through the fused meta-loss op
        (:meth:`FastWeightLinear.meta_loss`): every task's query loss ``[B]`` in the units of
        :meth:`query_losses`, differentiable (the exact meta-gradient), with the query accuracy
        and the inner losses ``[B, T]`` of the same adaptation (a forward without gradient)."""
        support = self.body(batch["support_x"])
        query = self.body(batch["query_x"])
        head = self.head
        per_task = inner_loss_units(
            head.meta_loss(support, batch["support_y"], query, batch["query_y"], steps,
                           first_order=first_order, reduction="none"),
            head.loss, head.out_features)
        with torch.no_grad():
            out = head.adapt(support, batch["support_y"], steps, first_order=first_order)
            _, accuracy = self.query_losses(head(query, out.weight, out.bias), batch)
        return per_task, accuracy, inner_loss_units(out.losses, head.loss, head.out_features)

    def unadapted(self, batch: TaskBatch) -> Tensor:
        """The meta-init's predictions on the query set, before any inner step."""
        return self(batch["query_x"])

    def query_losses(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor | None]:
        return query_losses(pred, batch["query_y"], self.head.loss)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU after each."""
    layers = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


def head_model(config, body_sizes: list[int], d_out: int, loss: str) -> HeadModel:
    """The body MLP and the adapting head for ``config`` (a resolved TrainConfig)."""
    metasgd = config.algo == "metasgd"
    head = FastWeightLinear(body_sizes[-1], d_out, steps=config.inner_steps,
                            inner_lr=config.inner_lr, loss=loss, learn_lr=metasgd,
                            meta_sgd=metasgd and config.adapt == "head")
    return HeadModel(mlp(body_sizes), head, adapt=config.adapt,
                     meta_sgd_all=metasgd and config.adapt != "head")
