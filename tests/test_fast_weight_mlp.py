"""fast_weight_mlp_unroll and fast_weight_mlp_meta_loss (docs/ops/fast_weight_mlp.md) against
the float64 reference (autograd with create_graph through the reference unroll): L = 1, 2, 3,
each activation, both losses, both x forms, both query forms, shared and per-task layers mixed,
no biases, lr_scale, first order, checkpointing, reductions, odd widths and m = 1; L = 1 against
the linear ops; opcheck, torch.compile, no_grad, B = 0 and bad input. Outputs of the compiled
kernels are NaN-poisoned (conftest)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import metakernels as mk
from conftest import COMPILED_BACKENDS, TOLERANCE, rel_err
from metakernels.ops import fast_weight_mlp as mlp_ops

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="no cpu backend built")


@dataclasses.dataclass(frozen=True)
class MlpCase:
    widths: tuple = (3, 5, 2)
    tasks: int = 3
    steps: int = 3
    support: int = 4
    activation: str = "tanh"
    loss: str = "mse"
    per_step: bool = False
    layers: str = "shared"      # "shared", "task", or "mixed" (alternating)
    bias: str | None = "shared"  # None, "shared", "task", "mixed"
    lr_form: str = "float"      # float | full [B, T] | steps [T]
    lr_scale: bool = False
    queries: int = 0            # m (unroll readout, or the meta-loss query rows)
    first_order: bool = False


def _form(kind: str, index: int) -> str:
    return kind if kind != "mixed" else ("task" if index % 2 else "shared")


def make_mlp_inputs(case: MlpCase, dtype=torch.float64, seed: int = 0) -> dict:
    """The positional and keyword arguments of fast_weight_mlp_unroll, every floating input
    differentiable."""
    gen = torch.Generator().manual_seed(seed)
    B, T, n, w = case.tasks, case.steps, case.support, case.widths

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    weights, biases = [], []
    for l, (d_in, d_out) in enumerate(zip(w[:-1], w[1:])):
        lead = (B,) if _form(case.layers, l) == "task" else ()
        weights.append(randn(*lead, d_in, d_out, scale=d_in ** -0.5).requires_grad_())
        if case.bias is not None:
            lead = (B,) if _form(case.bias, l) == "task" else ()
            biases.append(randn(*lead, d_out, scale=0.5).requires_grad_())
    lead = (B, T, n) if case.per_step else (B, n)
    x = randn(*lead, w[0]).requires_grad_()
    if case.loss == "mse":
        y = randn(*lead, w[-1]).requires_grad_()
    else:
        y = torch.randint(0, w[-1], lead, generator=gen)
    if case.lr_form == "float":
        lr = 0.3
    elif case.lr_form == "full":
        lr = (0.1 + 0.3 * torch.rand((B, T), generator=gen, dtype=torch.float64)).to(dtype)
        lr.requires_grad_()
    else:
        lr = (0.1 + 0.3 * torch.rand((T,), generator=gen, dtype=torch.float64)).to(dtype)
        lr.requires_grad_()
    kwargs = dict(weights=weights, biases=biases if case.bias is not None else None, x=x, y=y,
                  lr=lr, activation=case.activation, loss=case.loss,
                  first_order=case.first_order)
    if not case.per_step:
        kwargs["steps"] = T
    if case.lr_scale:
        kwargs["lr_scale"] = [(0.5 + torch.rand((a, b), generator=gen, dtype=torch.float64))
                              .to(dtype).requires_grad_() for a, b in zip(w[:-1], w[1:])]
    return kwargs


def add_queries(kwargs: dict, case: MlpCase, form: str, dtype=torch.float64, seed: int = 5):
    """A query set: readout queries (unroll), or query_x / query_y of form A or B."""
    gen = torch.Generator().manual_seed(seed)
    B, T, m, w = case.tasks, case.steps, case.queries, case.widths
    lead = (B, m) if form == "A" else (B, T, m)
    q = (torch.randn(lead + (w[0],), generator=gen, dtype=torch.float64)).to(dtype)
    q.requires_grad_()
    if form == "readout":
        return dict(kwargs, queries=q)
    if case.loss == "mse":
        qy = torch.randn(lead + (w[-1],), generator=gen, dtype=torch.float64).to(dtype)
        qy.requires_grad_()
    else:
        qy = torch.randint(0, w[-1], lead, generator=gen)
    return dict(kwargs, query_x=q, query_y=qy)


def leaves(kwargs: dict) -> dict:
    """Every differentiable tensor of the arguments, named (list entries as name[l])."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            out[key] = value
        elif isinstance(value, list):
            for index, tensor in enumerate(value):
                if tensor.requires_grad:
                    out[f"{key}[{index}]"] = tensor
    return out


def run(kwargs: dict, backend: str, meta: bool, reduction: str = "mean", **options) -> dict:
    """The outputs and the gradient of every differentiable input under fixed random
    cotangents."""
    if meta:
        outputs = [mk.fast_weight_mlp_meta_loss(**kwargs, reduction=reduction, backend=backend,
                                                **options)]
        result = {"loss": outputs[0]}
    else:
        out = mk.fast_weight_mlp_unroll(**kwargs, backend=backend, **options)
        outputs = list(out.weights) + list(out.biases or ()) + (
            [out.readout] if out.readout is not None else [])
        result = {f"out{i}": t for i, t in enumerate(outputs)}
        result["losses"] = out.losses
    gen = torch.Generator().manual_seed(11)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in outputs]
    named = leaves(kwargs)
    grads = torch.autograd.grad(outputs, list(named.values()), cot, allow_unused=True)
    result.update({f"grad_{k}": g for k, g in zip(named, grads)})
    return result


def assert_matches(result: dict, expected: dict, tol: float, label: str = "") -> None:
    assert result.keys() == expected.keys(), label
    for key, want in expected.items():
        got = result[key]
        if want is None or got is None:
            # The fused op returns zeros where autograd finds no path (and vice versa).
            other = want if got is None else got
            assert other is None or float(other.abs().max()) == 0.0, f"{label} {key}"
            continue
        err = rel_err(got, want)
        assert err <= tol, f"{label} {key}: relative error {err:.3e} > {tol:.0e}"


def to_dtype(kwargs: dict, dtype) -> dict:
    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().to(dtype).requires_grad_(t.requires_grad)
        return t
    return {k: [cast(t) for t in v] if isinstance(v, list) else cast(v)
            for k, v in kwargs.items()}


# Each case turns on a few features; together they cover every axis of the list.
CASES = [
    ("L1-relu", MlpCase(widths=(4, 3), activation="relu"), "unroll"),
    ("L2-tanh-readout", MlpCase(queries=2, layers="mixed", bias="mixed"), "readout"),
    ("L2-gelu-A", MlpCase(activation="gelu", queries=3, lr_form="full"), "A"),
    ("L2-silu-B-4d", MlpCase(activation="silu", per_step=True, queries=1, layers="task"), "B"),
    ("L3-relu-ce-A", MlpCase(widths=(3, 7, 5, 4), activation="relu", loss="ce", queries=2,
                             bias=None), "A"),
    ("L3-gelu-ce-B", MlpCase(widths=(5, 3, 7, 3), activation="gelu", loss="ce", queries=2,
                             per_step=True, lr_scale=True), "B"),
    ("L2-silu-lrscale", MlpCase(activation="silu", lr_scale=True, lr_form="steps",
                                layers="mixed"), "unroll"),
    ("L2-tanh-first-order-A", MlpCase(first_order=True, queries=3, lr_scale=True), "A"),
    ("L2-relu-first-order-B", MlpCase(activation="relu", first_order=True, queries=2,
                                      per_step=True, lr_form="full"), "B"),
    ("odd-widths-1-63-1", MlpCase(widths=(1, 63, 1), activation="relu", queries=1,
                                  support=5, tasks=2), "A"),
    ("odd-widths-65", MlpCase(widths=(7, 65, 3), activation="gelu", queries=1, tasks=2,
                              steps=2), "B"),
    ("m1-ce-readout", MlpCase(widths=(3, 4, 3), loss="ce", queries=1, activation="silu",
                              bias="task"), "readout"),
]


@pytest.mark.parametrize("name,case,form", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, case, form):
    kwargs = make_mlp_inputs(case)
    if form != "unroll":
        kwargs = add_queries(kwargs, case, form)
    meta = form in ("A", "B")
    expected = run(kwargs, "reference", meta)
    assert_matches(run(kwargs, "cpu", meta), expected, TOLERANCE[torch.float64], name)
    assert_matches(run(kwargs, "cpu", meta, checkpoint=True), expected,
                   TOLERANCE[torch.float64], name + " checkpoint")
    f32 = run(to_dtype(kwargs, torch.float32), "cpu", meta)
    for key, value in f32.items():
        if value is not None:
            assert value.dtype == torch.float32, key
    assert_matches(f32, expected, TOLERANCE[torch.float32], name + " float32")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    case = MlpCase(activation="gelu", queries=2, steps=5)
    kwargs = add_queries(make_mlp_inputs(case), case, "A")
    expected = run(kwargs, "reference", True, reduction)
    assert_matches(run(kwargs, "cpu", True, reduction), expected, TOLERANCE[torch.float64])


def test_checkpoint_long_unroll():
    """T = 10 with segments of 4 (the last one shorter), 4-D x, readout."""
    case = MlpCase(steps=10, per_step=True, queries=2, activation="silu", layers="mixed")
    kwargs = add_queries(make_mlp_inputs(case), case, "readout")
    expected = run(kwargs, "reference", False)
    assert_matches(run(kwargs, "cpu", False, checkpoint=True), expected, TOLERANCE[torch.float64])


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_one_layer_equals_linear_ops(loss):
    """With L = 1 the MLP ops are fast_weight_unroll and fast_weight_meta_loss."""
    case = MlpCase(widths=(5, 4), loss=loss, queries=3, bias="task", lr_scale=True,
                   lr_form="full")
    kwargs = add_queries(make_mlp_inputs(case), case, "readout")
    linear = dict(weight=kwargs["weights"][0], x=kwargs["x"], y=kwargs["y"], lr=kwargs["lr"],
                  steps=kwargs["steps"], loss=loss, bias=kwargs["biases"][0],
                  lr_scale=kwargs["lr_scale"][0], queries=kwargs["queries"])
    for backend in ("cpu", "reference"):
        out = mk.fast_weight_mlp_unroll(**kwargs, backend=backend)
        ref = mk.fast_weight_unroll(**linear, backend="reference")
        for got, want in ((out.weights[0], ref.weight), (out.biases[0], ref.bias),
                          (out.losses, ref.losses), (out.readout, ref.readout)):
            assert rel_err(got, want) <= 1e-12, backend
    meta = add_queries(make_mlp_inputs(case), case, "A")
    linear_meta = dict(weight=meta["weights"][0], x=meta["x"], y=meta["y"], lr=meta["lr"],
                       query_x=meta["query_x"], query_y=meta["query_y"], steps=meta["steps"],
                       loss=loss, bias=meta["biases"][0], lr_scale=meta["lr_scale"][0])
    got = mk.fast_weight_mlp_meta_loss(**meta, backend="cpu")
    want = mk.fast_weight_meta_loss(**linear_meta, backend="reference")
    assert rel_err(got, want) <= 1e-12
    named = leaves(meta)
    g_mlp = torch.autograd.grad(got, list(named.values()))
    g_lin = torch.autograd.grad(want, list(named.values()), allow_unused=True)
    for key, a, b in zip(named, g_mlp, g_lin):
        if b is None:
            assert float(a.abs().max()) == 0.0, key
        else:
            assert rel_err(a, b) <= 1e-10, key


def test_no_grad_and_empty_batch():
    case = MlpCase(queries=2)
    kwargs = add_queries(make_mlp_inputs(case), case, "readout")
    with torch.no_grad():
        out = mk.fast_weight_mlp_unroll(**kwargs, backend="cpu")
        ref = mk.fast_weight_mlp_unroll(**kwargs, backend="reference")
    assert not out.weights[0].requires_grad
    assert rel_err(out.readout, ref.readout) <= 1e-10
    empty = make_mlp_inputs(dataclasses.replace(case, tasks=0, layers="shared"))
    out = mk.fast_weight_mlp_unroll(**empty, backend="cpu")
    assert out.weights[1].shape == (0, 5, 2) and out.losses.shape == (0, 3)
    (out.weights[0].sum() + out.weights[1].sum()).backward()
    assert float(empty["weights"][0].grad.abs().sum()) == 0.0


def test_double_backward_raises():
    case = MlpCase(queries=2)
    kwargs = add_queries(make_mlp_inputs(case), case, "A")
    loss = mk.fast_weight_mlp_meta_loss(**kwargs, backend="cpu")
    (grad,) = torch.autograd.grad(loss, kwargs["weights"][0], create_graph=True)
    with pytest.raises(RuntimeError, match="fast_weight_mlp.*double backward"):
        grad.sum().backward()


def test_custom_op_path_and_opcheck():
    """The registered custom ops (what torch.compile and other tracers run) give the eager fast
    path's gradients; opcheck passes on the forward op."""
    case = MlpCase(activation="gelu", queries=2, lr_form="full", layers="mixed")
    kwargs = add_queries(make_mlp_inputs(case), case, "B")
    eager = run(kwargs, "cpu", True)
    original = mlp_ops._plain_eager
    try:
        mlp_ops._plain_eager = lambda *tensors: False
        traced = run(kwargs, "cpu", True)
    finally:
        mlp_ops._plain_eager = original
    assert_matches(traced, eager, 1e-13)
    w = [t.expand(3, *t.shape[-2:]).contiguous().detach().requires_grad_()
         for t in kwargs["weights"]]
    b = [t.expand(3, t.shape[-1]).contiguous().detach().requires_grad_() for t in kwargs["biases"]]
    args = (w, b, kwargs["x"].detach().requires_grad_(), kwargs["y"].detach(),
            kwargs["lr"].detach().requires_grad_(), [], kwargs["query_x"].detach(),
            kwargs["query_y"].detach(), 2, 0, False, 1, 0, "cpu")
    torch.library.opcheck(torch.ops.metakernels.fast_weight_mlp_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_torch_compile_fullgraph():
    case = MlpCase(activation="silu", queries=2)
    kwargs = add_queries(make_mlp_inputs(case), case, "A")
    reference_loss = mk.fast_weight_mlp_meta_loss(**kwargs, backend="reference")
    expected_grads = torch.autograd.grad(reference_loss, kwargs["weights"])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def meta_loss(weights, biases, x, y, query_x, query_y):
        return mk.fast_weight_mlp_meta_loss(weights, biases, x, y, 0.3, query_x, query_y,
                                            steps=3, activation="silu", backend="cpu")

    loss = meta_loss(kwargs["weights"], kwargs["biases"], kwargs["x"], kwargs["y"],
                     kwargs["query_x"], kwargs["query_y"])
    assert rel_err(loss, reference_loss) <= 1e-10
    grads = torch.autograd.grad(loss, kwargs["weights"])
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) <= 1e-10


BAD = [
    (dict(weights=torch.zeros(3, 5)), TypeError, "weights must be a list or tuple"),
    (dict(weights=[]), ValueError, "weights is empty"),
    (dict(weights=[torch.zeros(3, 5, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)]),
     ValueError, r"weights\[1\] has shape \[4, 2\].*chain"),
    (dict(weights=[torch.zeros(2, 5, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)]),
     ValueError, r"weights\[0\] has shape \[2, 5\]"),
    (dict(biases=[torch.zeros(5, dtype=torch.float64)]), ValueError,
     "biases has 1 tensors but weights has 2"),
    (dict(biases=[torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]),
     ValueError, r"biases\[1\] has shape \[3\]"),
    (dict(lr_scale=[torch.ones(3, 5, dtype=torch.float64)]), ValueError,
     "lr_scale has 1 tensors"),
    (dict(activation="softplus"), ValueError, "activation must be one of"),
    (dict(activation=None), TypeError, "activation must be a str"),
    (dict(weights=[torch.zeros(3, 5), torch.zeros(5, 2)], biases=None), ValueError,
     r"x has dtype float64 but weights\[0\] has float32"),
    (dict(steps=None), ValueError, "steps is missing"),
    (dict(y=torch.zeros(2, 4, 3, dtype=torch.float64)), ValueError, r"y has shape \[2, 4, 3\]"),
    (dict(lr=torch.ones(5, dtype=torch.float64)), ValueError, "lr has shape"),
    (dict(loss="ce", y=torch.full((2, 4), 7)), ValueError, r"y holds labels in \[7, 7\]"),
    (dict(checkpoint=1), TypeError, "checkpoint must be None"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input(change, error, match):
    f64 = dict(dtype=torch.float64)
    kwargs = dict(weights=[torch.zeros(3, 5, **f64), torch.zeros(5, 2, **f64)],
                  biases=[torch.zeros(5, **f64), torch.zeros(2, **f64)],
                  x=torch.zeros(2, 4, 3, **f64), y=torch.zeros(2, 4, 2, **f64), lr=0.1, steps=2)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        mk.fast_weight_mlp_unroll(**kwargs, backend="cpu")


def test_bad_query_input():
    f64 = dict(dtype=torch.float64)
    kwargs = dict(weights=[torch.zeros(3, 5, **f64), torch.zeros(5, 2, **f64)], biases=None,
                  x=torch.zeros(2, 4, 3, **f64), y=torch.zeros(2, 4, 2, **f64), lr=0.1, steps=2)
    with pytest.raises(ValueError, match="query_x has shape"):
        mk.fast_weight_mlp_meta_loss(**kwargs, query_x=torch.zeros(2, 3, 4, **f64),
                                     query_y=torch.zeros(2, 3, 2, **f64))
    with pytest.raises(ValueError, match="query_y has shape"):
        mk.fast_weight_mlp_meta_loss(**kwargs, query_x=torch.zeros(2, 3, 3, **f64),
                                     query_y=torch.zeros(2, 3, 3, **f64))
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.fast_weight_mlp_meta_loss(**kwargs, query_x=torch.zeros(2, 3, 3, **f64),
                                     query_y=torch.zeros(2, 3, 2, **f64), reduction="avg")


@pytest.mark.parametrize("task_name", ["sinusoid", "fewshot"])
@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd", "reptile"])
def test_trainer_adapt_all_through_the_op_equals_generic(task_name, algo):
    """``--adapt all`` (the MLP op) and ``--adapt all-generic`` (torch.func) leave the same
    meta-gradient in every parameter after one meta-step, in float64."""
    from metakernels.train import TrainConfig
    from metakernels.train.algorithms import meta_step
    from metakernels.train.loop import resolve
    from metakernels.train.tasks import make_task

    grads = {}
    for adapt in ("all", "all-generic"):
        task = make_task(task_name)
        config = resolve(TrainConfig(task=task_name, algo=algo, adapt=adapt, steps=1, out="",
                                     meta_batch=3, inner_steps=2), task, None)
        task.configure(config)
        torch.manual_seed(0)
        model = task.build_model(config).double()
        if adapt == "all":
            assert model._mlp_layers() is not None
        batch = task.sample(3, torch.Generator().manual_seed(1), "train")
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        meta_step(model, batch, algo, 2, 3)
        grads[adapt] = {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}
    assert grads["all"].keys() == grads["all-generic"].keys()
    for name, want in grads["all-generic"].items():
        assert rel_err(grads["all"][name], want) <= 1e-10, name


def test_nn_fast_weight_mlp():
    """FastWeightMLP: meta_loss is the query loss of forward() on adapt()'s layers, and its
    gradient reaches every parameter (Meta-SGD scales and learned lrs included)."""
    from metakernels.nn import FastWeightMLP
    torch.manual_seed(0)
    net = FastWeightMLP([3, 6, 2], steps=3, inner_lr=0.2, activation="tanh", learn_lr=True,
                        meta_sgd=True).double()
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    qx, qy = torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(4, 7, 2, dtype=torch.float64)
    loss = net.meta_loss(x, y, qx, qy)
    adapted = net.adapt(x, y)
    pred = net(qx, adapted)
    expected = (0.5 * (pred - qy).pow(2).sum((-2, -1)) / 7).mean()
    assert rel_err(loss, expected) <= 1e-12
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    assert net(qx).shape == (4, 7, 2)
    with pytest.raises(ValueError, match="learning rates for 3 steps"):
        net.adapt(x, y, steps=4)
