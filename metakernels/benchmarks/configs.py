"""The standard benchmark configurations (docs/conventions.md, benchmark configurations) and the
random meta-steps they describe."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import Tensor

# Scalar inner lr of the MAML configurations: x ~ N(0, 1) keeps lr · λ_max(XᵀX / n) below 1 at
# these sizes (about 0.9 for maml-small), a stable inner loop that still moves the weights.
SCALAR_INNER_LR = 0.1


@dataclass(frozen=True)
class BenchConfig:
    """One row of the standard configurations (docs/conventions.md).

    name:         the row's name, e.g. ``"maml-small"``.
    tasks:        B.
    steps:        T inner steps.
    support:      n support rows per task (per step when ``x_per_step``).
    d_in, d_out:  the linear model's sizes.
    loss:         ``"mse"`` or ``"ce"``, inner and outer.
    x_per_step:   x is ``[B, T, n, d_in]``, one batch per step (a trajectory); otherwise
                  ``[B, n, d_in]``, the same support set every step (MAML).
    bias:         the model has a bias, shared (``[d_out]``) or per task like the init.
    shared_init:  the init is ``[d_in, d_out]`` (and ``[d_out]``) shared by every task, its
                  meta-gradient summed over tasks; otherwise ``[B, d_in, d_out]`` (``[B, d_out]``),
                  one initial state per task.
    lr_per_step:  the inner lr is a ``[T]`` tensor; otherwise the python float 0.1.
    queries:      m readout rows per step (0: none). With a readout the outer loss is on the
                  readout; without, on a query set the size of the support set.
    device_note:  ``""``, or ``"GPU"`` for the sizes meant for a GPU.
    """

    name: str
    tasks: int
    steps: int
    support: int
    d_in: int
    d_out: int
    loss: str
    x_per_step: bool
    bias: bool
    shared_init: bool
    lr_per_step: bool
    queries: int
    device_note: str = ""

    def describe(self) -> str:
        """One line: the sizes and options, e.g. for a table's title."""
        x_layout = "4-D x" if self.x_per_step else "3-D x"
        parts = [f"B={self.tasks} T={self.steps} ({x_layout}) n={self.support} "
                 f"{self.d_in}x{self.d_out} {self.loss}",
                 "shared init" if self.shared_init else "per-task init"]
        if self.bias:
            parts.append("bias")
        parts.append("lr per step" if self.lr_per_step else "scalar lr")
        if self.queries:
            parts.append(f"readout m={self.queries}")
        if self.device_note:
            parts.append(f"({self.device_note})")
        return ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchConfig:
        return cls(**json.loads(text))


CONFIGS: dict[str, BenchConfig] = {config.name: config for config in (
    BenchConfig("maml-small", tasks=64, steps=5, support=16, d_in=64, d_out=64, loss="mse",
                x_per_step=False, bias=False, shared_init=True, lr_per_step=False, queries=0),
    # A 5-way 5-shot classification head: n = 25 support rows, d_out = 5 classes.
    BenchConfig("maml-ce", tasks=64, steps=5, support=25, d_in=64, d_out=5, loss="ce",
                x_per_step=False, bias=True, shared_init=True, lr_per_step=False, queries=0),
    BenchConfig("trajectory", tasks=16, steps=64, support=16, d_in=128, d_out=128, loss="mse",
                x_per_step=True, bias=False, shared_init=False, lr_per_step=True, queries=16),
    # n = 1 with a readout is the delta rule (docs/ops/fast_weight_unroll.md): W = Sᵀ, β_t = η_t.
    BenchConfig("delta-rule", tasks=32, steps=1024, support=1, d_in=128, d_out=128, loss="mse",
                x_per_step=True, bias=False, shared_init=False, lr_per_step=True, queries=1,
                device_note="GPU"),
    BenchConfig("large", tasks=1024, steps=10, support=64, d_in=128, d_out=128, loss="mse",
                x_per_step=False, bias=False, shared_init=True, lr_per_step=False, queries=0,
                device_note="GPU"),
)}


@dataclass
class MetaProblem:
    """The inputs of one meta-step.

    params: the meta-parameters, leaves with ``requires_grad``: ``"weight"`` ``[d_in, d_out]``
        (shared init) or ``[B, d_in, d_out]``, and ``"bias"`` ``[d_out]`` or ``[B, d_out]`` when
        the config has one.
    batch: per-task tensors, each with a leading ``[B]``:
        ``support_x`` ``[B, n, d_in]`` or ``[B, T, n, d_in]``;
        ``support_y`` float ``[..., d_out]`` (mse) or int64 labels (ce), leading shape of support_x;
        without a readout, the outer set ``query_x`` ``[B, n, d_in]`` and ``query_y`` like
        support_y;
        with one, ``readout_queries`` ``[B, T, m, d_in]`` and ``readout_y`` ``[B, T, m, d_out]``
        (mse) or ``[B, T, m]`` labels (ce).
    inner_lr: the python float 0.1, or a ``[T]`` tensor.
    """

    config: BenchConfig
    params: dict[str, Tensor]
    batch: dict[str, Tensor]
    inner_lr: float | Tensor

    @property
    def steps(self) -> int | None:
        """The ``steps`` argument of fast_weight_unroll: T with 3-D x, None with 4-D x."""
        return None if self.config.x_per_step else self.config.steps

    def to(self, dtype: torch.dtype) -> MetaProblem:
        """The same values in ``dtype`` (float tensors only; labels stay int64), with fresh
        leaves for params: the float64 reference of a float32 problem sees the same inputs."""
        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype) if t.is_floating_point() else t
        params = {name: cast(p).requires_grad_() for name, p in self.params.items()}
        batch = {name: cast(t) for name, t in self.batch.items()}
        inner_lr = cast(self.inner_lr) if isinstance(self.inner_lr, Tensor) else self.inner_lr
        return MetaProblem(self.config, params, batch, inner_lr)


def make_problem(config: BenchConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0) -> MetaProblem:
    """Fresh random inputs for one meta-step of ``config``.

    The values are drawn in float64 on the CPU from ``seed`` and then cast, so a seed gives the
    same problem on every device and (up to rounding) every dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    c = config

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def targets(*lead: int) -> Tensor:
        if c.loss == "ce":
            return torch.randint(0, c.d_out, lead, generator=gen)
        return normal(*lead, c.d_out)

    per_task = () if c.shared_init else (c.tasks,)
    # A small init, so the first inner steps are not dominated by a large random model.
    params = {"weight": normal(*per_task, c.d_in, c.d_out) / c.d_in ** 0.5}
    if c.bias:
        params["bias"] = 0.1 * normal(*per_task, c.d_out)

    if c.x_per_step:
        lead = (c.tasks, c.steps, c.support)
        # Unit-norm rows, as DeltaNet normalises its keys: any lr below 2 then stays stable even
        # with n = 1, where one step's curvature is ‖x‖².
        support_x = torch.nn.functional.normalize(normal(*lead, c.d_in), dim=-1)
    else:
        lead = (c.tasks, c.support)
        support_x = normal(*lead, c.d_in)
    batch = {"support_x": support_x, "support_y": targets(*lead)}
    if c.queries:
        readout_lead = (c.tasks, c.steps, c.queries)
        batch["readout_queries"] = torch.nn.functional.normalize(
            normal(*readout_lead, c.d_in), dim=-1)
        batch["readout_y"] = targets(*readout_lead)
    else:
        batch["query_x"] = normal(c.tasks, c.support, c.d_in)
        batch["query_y"] = targets(c.tasks, c.support)

    if c.lr_per_step:
        inner_lr: float | Tensor = 0.1 + 0.8 * torch.rand(c.steps, generator=gen,
                                                          dtype=torch.float64)
    else:
        inner_lr = SCALAR_INNER_LR

    def place(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return MetaProblem(
        config,
        params={name: place(p).requires_grad_() for name, p in params.items()},
        batch={name: place(t) for name, t in batch.items()},
        inner_lr=place(inner_lr) if isinstance(inner_lr, Tensor) else inner_lr,
    )
