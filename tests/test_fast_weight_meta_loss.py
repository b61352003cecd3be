"""fast_weight_meta_loss (docs/ops/fast_weight_meta_loss.md) against the float64 reference: both
query forms, both losses, both x forms, every input form of the unroll, reductions, first order,
checkpointing, odd sizes, m = 1, the switch of every cpu path, opcheck, torch.compile and bad
inputs. Outputs of the compiled kernels are NaN-poisoned (conftest)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import metakernels as mk
from conftest import (COMPILED_BACKENDS, FEATURES, TOLERANCE, Case, cast_inputs, differentiable,
                      make_inputs, rel_err)
from metakernels.ops import meta_loss_path

pytestmark = pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built")


def make_meta_inputs(case: Case, form: str = "A", m: int = 3, dtype=torch.float64,
                     seed: int = 0) -> dict:
    """make_inputs' unroll arguments plus a query set: form A ``query_x [B, m, d_in]``, form B
    ``[B, T, m, d_in]``; query_y targets (mse, differentiable) or labels (ce)."""
    inputs = make_inputs(dataclasses.replace(case, queries=0), dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    B, T, d_in, d_out = case.tasks, case.steps, case.d_in, case.d_out
    lead = (B, m) if form == "A" else (B, T, m)
    inputs["query_x"] = (torch.randn(lead + (d_in,), generator=gen, dtype=torch.float64)
                         * d_in ** -0.5).to(dtype).requires_grad_()
    if case.loss == "mse":
        inputs["query_y"] = torch.randn(lead + (d_out,), generator=gen,
                                        dtype=torch.float64).to(dtype).requires_grad_()
    else:
        inputs["query_y"] = torch.randint(0, d_out, lead, generator=gen)
    return inputs


def run_meta(kwargs: dict, backend: str, reduction: str = "mean", **options) -> dict:
    """The meta-loss and the gradient of every differentiable input (a random cotangent for
    reduction='none')."""
    meta_loss = mk.fast_weight_meta_loss(**kwargs, reduction=reduction, backend=backend,
                                         **options)
    leaves = differentiable(kwargs)
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(meta_loss.shape, generator=gen, dtype=torch.float64).to(meta_loss.dtype)
    grads = torch.autograd.grad(meta_loss, list(leaves.values()), cotangent, allow_unused=True)
    return {"loss": meta_loss, **{f"grad_{k}": g for k, g in zip(leaves, grads)}}


def assert_meta_close(result: dict, expected: dict, dtype, label: str = "") -> None:
    """run_meta's result against the reference's: the same gradients present, each in ``dtype``
    within the tolerance of docs/conventions.md for it."""
    for key, want in expected.items():
        got = result[key]
        if want is None or got is None:
            assert got is None and want is None, f"{label} {key}: {got is None=} {want is None=}"
            continue
        assert got.dtype == dtype, f"{label} {key} has dtype {got.dtype}"
        err = rel_err(got, want)
        assert err <= TOLERANCE[dtype], f"{label} {key}: {err:.3e} > {TOLERANCE[dtype]:.0e}"


def check(case: Case, form: str, dtype, backend: str, m: int = 3, seed: int = 0,
          reduction: str = "mean", **options) -> dict:
    inputs = make_meta_inputs(case, form, m, dtype, seed)
    expected = run_meta(cast_inputs(inputs, torch.float64), "reference", reduction)
    result = run_meta(inputs, backend, reduction, **options)
    assert_meta_close(result, expected, dtype, f"{backend} {case} form {form} {dtype}")
    return result


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("features", range(len(FEATURES)))
def test_matches_reference(backend, dtype, first_order, per_step, loss, form, features):
    options = {k: v for k, v in FEATURES[features].items() if k != "queries"}
    case = Case(loss=loss, per_step=per_step, first_order=first_order, **options)
    check(case, form, dtype, backend, seed=features)


SIZES = [  # (B, T, n, m, d_in, d_out): ones, odd, across the vector blocks, a wide head
    (1, 1, 1, 1, 1, 1),
    (2, 3, 7, 1, 63, 65),
    (3, 2, 16, 3, 64, 64),
    (2, 5, 3, 7, 70, 1),
    (4, 2, 25, 63, 64, 5),
    (1, 3, 1, 65, 129, 17),
]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_sizes(backend, dtype, loss, size):
    B, T, n, m, d_in, d_out = size
    for per_step in (False, True):
        for form in ("A", "B"):
            case = Case(loss=loss, per_step=per_step, tasks=B, steps=T, support=n, d_in=d_in,
                        d_out=d_out, weight="task", bias="shared", lr_form="full",
                        lr_scale=True, bias_lr_scale=True)
            check(case, form, dtype, backend, m=m, seed=sum(size))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["A", "B"])
def test_reductions(backend, reduction, form):
    case = Case(loss="ce", bias="task", lr_form="tasks")
    result = check(case, form, torch.float64, backend, reduction=reduction)
    assert result["loss"].shape == ((3,) if reduction == "none" else ())


def test_reductions_relate():
    """mean = sum / B, and sum = Σ none, on the same inputs."""
    inputs = make_meta_inputs(Case(loss="mse", bias="shared"), "B")
    none = mk.fast_weight_meta_loss(**inputs, reduction="none")
    total = mk.fast_weight_meta_loss(**inputs, reduction="sum")
    mean = mk.fast_weight_meta_loss(**inputs, reduction="mean")
    assert rel_err(total, none.sum()) < 1e-14 and rel_err(mean, total / 3) < 1e-14


def test_reference_is_the_unroll_plus_torch_losses():
    """The reference meta-loss is the reference unroll followed by PyTorch's own losses (form A:
    F.mse_loss / F.cross_entropy of the adapted model, per task; form B: the readout's)."""
    F = torch.nn.functional
    for loss in ("mse", "ce"):
        for form in ("A", "B"):
            inputs = make_meta_inputs(Case(loss=loss, bias="task"), form)
            query_x, query_y = inputs.pop("query_x"), inputs.pop("query_y")
            out = mk.fast_weight_unroll(**inputs, queries=query_x if form == "B" else None,
                                        backend="reference")
            logits = (query_x @ out.weight + out.bias[:, None] if form == "A" else out.readout)
            if loss == "mse":
                per_task = 0.5 * logits.shape[-1] * torch.stack(
                    [F.mse_loss(logits[b], query_y[b]) for b in range(3)])
            else:
                per_task = torch.stack([F.cross_entropy(logits[b].reshape(-1, 6),
                                                        query_y[b].reshape(-1)) for b in range(3)])
            if form == "B":
                per_task = per_task * 4  # mean over T·m rows = (1/T) Σ_t, the op sums over t
            got = mk.fast_weight_meta_loss(**inputs, query_x=query_x, query_y=query_y,
                                           reduction="none", backend="reference")
            assert rel_err(got, per_task) < 1e-13, (loss, form)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_checkpoint(backend, form, loss):
    case = Case(loss=loss, per_step=form == "B", steps=9, weight="task", bias="shared",
                lr_form="full", lr_scale=True)
    inputs = make_meta_inputs(case, form)
    path = meta_loss_path(**inputs, checkpoint=True, backend=backend)
    assert "checkpoint(3)" in path, path
    check(case, form, torch.float64, backend, checkpoint=True)
    check(case, form, torch.float32, backend, checkpoint=True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_checkpoint_every_input(backend, steps):
    """Checkpointed, every input form at once, segment counts from 1 to 4, both query forms;
    with x's gradient (the recomputed segments store W_t) and without."""
    case = Case(loss="mse", steps=steps, weight="shared", bias="task", lr_form="full",
                lr_scale=True, bias_lr_scale=True)
    for form in ("A", "B"):
        check(case, form, torch.float64, backend, seed=steps, checkpoint=True)
        check(dataclasses.replace(case, per_step=True, loss="ce", first_order=True), form,
              torch.float64, backend, seed=steps, checkpoint=True, reduction="none")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_first_order_is_fomaml(backend):
    """FOMAML's meta-gradient of a per-task init is the query loss's gradient at W_T, and x and
    y get none; query_x and query_y still get theirs."""
    case = Case(loss="mse", weight="task", first_order=True)
    inputs = make_meta_inputs(case, "A")
    meta_loss = mk.fast_weight_meta_loss(**inputs, reduction="sum", backend=backend)
    names = ["weight", "x", "y", "query_x", "query_y"]
    grads = torch.autograd.grad(meta_loss, [inputs[k] for k in names], allow_unused=True)
    assert grads[1] is None and grads[2] is None
    assert grads[3] is not None and grads[4] is not None
    out = mk.fast_weight_unroll(**{k: v for k, v in inputs.items()
                                   if k not in ("query_x", "query_y")}, backend="reference")
    w_t = out.weight.detach().requires_grad_()
    outer = (0.5 * (inputs["query_x"].detach() @ w_t - inputs["query_y"].detach()).pow(2)
             .sum((1, 2)) / 3).sum()
    (expected,) = torch.autograd.grad(outer, w_t)
    assert rel_err(grads[0], expected) < 1e-12


@pytest.mark.parametrize("backend", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("form", ["A", "B"])
def test_zero_tasks(backend, form):
    inputs = make_meta_inputs(Case(tasks=0, bias="task", lr_form="full"), form)
    meta_loss = mk.fast_weight_meta_loss(**inputs, backend=backend)
    assert meta_loss.shape == () and meta_loss.item() == 0
    (grad_weight,) = torch.autograd.grad(meta_loss, inputs["weight"])
    assert torch.equal(grad_weight, torch.zeros(7, 6, dtype=torch.float64))
    none = mk.fast_weight_meta_loss(**inputs, reduction="none", backend=backend)
    assert none.shape == (0,)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_no_grad_and_non_contiguous(backend):
    case = Case(loss="mse", per_step=True, weight="task", bias="task", lr_form="full")
    inputs = make_meta_inputs(case, "B", seed=3)
    with torch.no_grad():
        got = mk.fast_weight_meta_loss(**inputs, backend=backend)
    assert got.grad_fn is None
    expected = mk.fast_weight_meta_loss(**inputs, backend="reference")
    assert rel_err(got, expected) < 1e-12
    strided = dict(inputs)
    strided["query_x"] = inputs["query_x"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    strided["x"] = inputs["x"].detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not strided["query_x"].is_contiguous()
    assert rel_err(mk.fast_weight_meta_loss(**strided, backend=backend), expected) < 1e-12


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_deterministic(backend):
    case = Case(loss="ce", per_step=True, weight="task", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, tasks=8, d_in=33, d_out=10)
    inputs = make_meta_inputs(case, "B", dtype=torch.float32)
    first, second = run_meta(inputs, backend), run_meta(inputs, backend)
    for key in first:
        if first[key] is not None:
            assert torch.equal(first[key], second[key]), key


# --- which cpu path runs, just inside and just outside its conditions ------------------------------

def gram_case(**changes) -> dict:
    """maml-small's shape cut down (n = 4 small next to d_in = 32, T = 2): the Gram path's
    conditions all hold; each test changes one."""
    case = Case(loss="mse", steps=2, support=4, d_in=32, d_out=16, tasks=3, bias="shared")
    return make_meta_inputs(dataclasses.replace(case, **changes), "A", m=5, seed=11)


def test_paths():
    """gram-space: form A's query loss in Gram space too (no W_T in the forward; X̃ Ŵ̃_T from the
    query set's Gram matrix in the backward); gram: the Gram unroll forming W_T (needed for
    query_x's gradient); steps: the step loop."""
    x_grad = gram_case()
    frozen = dict(x_grad, x=x_grad["x"].detach(), query_x=x_grad["query_x"].detach())
    # Inside: mse, 3-D x, T = 2, no lr_scale, n small next to d_in, no W_t to store (x without
    # grad), W_T not needed (query_x without grad).
    assert meta_loss_path(**frozen) == "fused:gram-space"
    # query_x's gradient needs W_T: the forward forms it; the backward stays in Gram space.
    assert meta_loss_path(**dict(frozen, query_x=x_grad["query_x"])) == "fused:gram/gram-space"
    # x's gradient in second order: the forward stores W_t (the loop).
    assert meta_loss_path(**dict(x_grad, query_x=frozen["query_x"])) == "fused:steps/gram-space"
    assert meta_loss_path(**dict(frozen, x=x_grad["x"], first_order=True)) == "fused:gram-space"
    # Outside, one condition at a time: T = 1, ce, 4-D x, lr_scale, n large next to d_in.
    assert meta_loss_path(**dict(frozen, steps=1)) == "fused:steps"
    for changed in (gram_case(loss="ce"), gram_case(per_step=True), gram_case(support=40)):
        assert meta_loss_path(**dict(changed, x=changed["x"].detach(),
                                     query_x=changed["query_x"].detach())) == "fused:steps"
    assert meta_loss_path(**dict(frozen, lr_scale=torch.ones(32, 16, dtype=torch.float64))) \
        == "fused:steps"
    # bias_lr_scale all ones stays inside; any other value (or its gradient) is outside.
    ones = torch.ones(16, dtype=torch.float64)
    assert meta_loss_path(**dict(frozen, bias_lr_scale=ones)) == "fused:gram-space"
    assert meta_loss_path(**dict(frozen, bias_lr_scale=ones * 1.5)) == "fused:steps"
    assert meta_loss_path(**dict(frozen, bias_lr_scale=ones.clone().requires_grad_())) \
        == "fused:gram-space/steps"
    # Without grad mode the forward alone runs: in Gram space.
    with torch.no_grad():
        assert meta_loss_path(**x_grad).startswith("fused:gram-space")
    # Form B (a readout every step) takes the Gram unroll where fast_weight_unroll's does.
    form_b = make_meta_inputs(Case(loss="mse", steps=2, support=4, d_in=32, d_out=16),
                              "B", m=1, seed=2)
    assert meta_loss_path(**dict(form_b, x=form_b["x"].detach(),
                                 query_x=form_b["query_x"].detach())) == "fused:gram"
    # Checkpointed: the same kernels segment by segment (each segment's end weight is the next
    # one's start, so the forward forms it); the reference is itself.
    assert meta_loss_path(**frozen, checkpoint=True) == "fused:gram/gram-space + checkpoint(2)"
    assert meta_loss_path(**frozen, backend="reference") == "reference"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("change", [
    {}, {"steps": 1}, {"loss": "ce"}, {"per_step": True}, {"lr_scale": True}, {"support": 40},
    {"bias_lr_scale": True}, {"first_order": True}, {"bias": None, "weight": "task"}], ids=str)
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-grad"])
@pytest.mark.parametrize("query_grad", [False, True], ids=["q-frozen", "q-grad"])
def test_every_path_matches_reference(dtype, change, x_grad, query_grad):
    case = dataclasses.replace(
        Case(loss="mse", steps=2, support=4, d_in=32, d_out=16, tasks=3, bias="shared",
             lr_form="full"), **change)
    for form in ("A", "B"):
        inputs = make_meta_inputs(case, form, m=5, dtype=dtype, seed=5)
        if not x_grad:
            inputs["x"] = inputs["x"].detach()
        if not query_grad:
            inputs["query_x"] = inputs["query_x"].detach()
        expected = run_meta(cast_inputs(inputs, torch.float64), "reference")
        assert_meta_close(run_meta(inputs, "cpu"), expected, dtype, f"form {form}")


# --- the custom ops -------------------------------------------------------------------------------

def opcheck_args(form: str, loss: str = "ce"):
    case = Case(loss=loss, per_step=True, weight="task", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, tasks=2, steps=3)
    kwargs = make_meta_inputs(case, form, m=2, seed=9)
    lr = kwargs["lr"].detach().requires_grad_()
    return (kwargs["weight"], kwargs["x"], kwargs["y"], lr, kwargs["bias"], kwargs["lr_scale"],
            kwargs["bias_lr_scale"], kwargs["query_x"], kwargs["query_y"],
            0 if loss == "mse" else 1, False, True, True, True, 0, "cpu")


@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_opcheck_forward_op(form, loss):
    torch.library.opcheck(torch.ops.metakernels.fast_weight_meta_loss_fwd.default,
                          opcheck_args(form, loss))


def test_opcheck_reduction_none():
    args = list(opcheck_args("A", "mse"))
    args[14] = 2
    torch.library.opcheck(torch.ops.metakernels.fast_weight_meta_loss_fwd.default, tuple(args))


@pytest.mark.parametrize("form", ["A", "B"])
def test_opcheck_backward_op(form):
    args = opcheck_args(form)
    with torch.no_grad():
        _, weight_t, residual, states, query_residual = \
            torch.ops.metakernels.fast_weight_meta_loss_fwd(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:9]]
    torch.library.opcheck(
        torch.ops.metakernels.fast_weight_meta_loss_bwd.default,
        (*detached, residual, states, weight_t, query_residual,
         torch.randn(2, dtype=torch.float64), 1, False,
         [True, True, False, True, True, True, True, True, False], "cpu"),
        test_utils=("test_schema", "test_faketensor"))


def test_opcheck_gram_space():
    """Form A in Gram space: W_T is not returned (query_x without grad)."""
    kwargs = gram_case()
    lr = torch.full((3, 2), 0.3, dtype=torch.float64, requires_grad=True)
    args = (kwargs["weight"], kwargs["x"].detach(), kwargs["y"], lr, kwargs["bias"], None, None,
            kwargs["query_x"].detach(), kwargs["query_y"], 0, False, False, False, False, 0, "cpu")
    torch.library.opcheck(torch.ops.metakernels.fast_weight_meta_loss_fwd.default, args)
    assert torch.ops.metakernels.fast_weight_meta_loss_fwd(*args)[1].numel() == 0


@pytest.mark.parametrize("form", ["A", "B"])
def test_opcheck_checkpoint_ops(form):
    args = list(opcheck_args(form))
    args[11] = 2  # segment (the store_states slot of the plain op)
    del args[12:14]
    torch.library.opcheck(torch.ops.metakernels.fast_weight_meta_loss_ckpt_fwd.default,
                          tuple(args))
    with torch.no_grad():
        _, starts_w, starts_b = torch.ops.metakernels.fast_weight_meta_loss_ckpt_fwd(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:9]]
    torch.library.opcheck(
        torch.ops.metakernels.fast_weight_meta_loss_ckpt_bwd.default,
        (*detached, starts_w, starts_b, torch.randn(2, dtype=torch.float64), 1, False,
         [True, True, False, True, True, True, True, True, False], 2, "cpu"),
        test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_gradcheck(backend):
    case = Case(loss="mse", tasks=2, steps=3, support=3, d_in=4, d_out=3, bias="shared",
                lr_form="full", lr_scale=True, bias_lr_scale=True)
    for form in ("A", "B"):
        kwargs = make_meta_inputs(case, form, m=2, seed=4)
        names = list(differentiable(kwargs))

        def function(*tensors):
            return mk.fast_weight_meta_loss(**dict(kwargs, **dict(zip(names, tensors))),
                                            reduction="none", backend=backend)
        assert torch.autograd.gradcheck(function, [kwargs[k] for k in names], eps=1e-6,
                                        atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_double_backward_raises(backend):
    kwargs = make_meta_inputs(Case(loss="mse"), "A")
    meta_loss = mk.fast_weight_meta_loss(**kwargs, backend=backend)
    (grad_weight,) = torch.autograd.grad(meta_loss, kwargs["weight"], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        grad_weight.sum().backward()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("form", ["A", "B"])
def test_torch_compile(backend, compiler, form):
    """A MAML meta-step compiled with fullgraph=True gives the eager meta-gradient."""
    kwargs = make_meta_inputs(Case(loss="ce", bias="shared", lr_form="full"), form, seed=3)
    names = ("weight", "bias", "x", "lr", "query_x")

    def meta_step(weight, bias, x, lr, query_x, y, query_y):
        return mk.fast_weight_meta_loss(weight, x, y, lr, query_x, query_y, steps=4, loss="ce",
                                        bias=bias, backend=backend)

    args = [kwargs[k] for k in names] + [kwargs["y"], kwargs["query_y"]]
    compiled = torch.compile(meta_step, fullgraph=True, backend=compiler)
    eager_loss = meta_step(*args)
    eager = torch.autograd.grad(eager_loss, args[:5])
    compiled_loss = compiled(*args)
    got = torch.autograd.grad(compiled_loss, args[:5])
    assert rel_err(compiled_loss, eager_loss) < 1e-12
    for g, e in zip(got, eager):
        assert rel_err(g, e) < 1e-12


# --- bad input --------------------------------------------------------------------------------------

def bad(**changes):
    kwargs = make_meta_inputs(Case(loss="ce", bias="shared"), "A")
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize("changes, error, match", [
    (dict(query_x=torch.randn(3, 2, 5, dtype=torch.float64)), ValueError, r"query_x has shape \[3, 2, 5\]"),
    (dict(query_x=torch.randn(4, 2, 7, dtype=torch.float64)), ValueError, r"query_x has shape \[4, 2, 7\]"),
    (dict(query_x=torch.randn(3, 7, dtype=torch.float64)), ValueError, r"query_x has shape \[3, 7\]"),
    (dict(query_x=torch.randn(3, 0, 7, dtype=torch.float64)), ValueError, r"m = 0"),
    (dict(query_x=torch.randn(3, 5, 2, 7, dtype=torch.float64)), ValueError, r"query_x has shape \[3, 5, 2, 7\]"),
    (dict(query_x=torch.randn(3, 3, 7, dtype=torch.float32)), ValueError, r"query_x has dtype float32"),
    (dict(query_x=[[1.0]]), TypeError, r"query_x must be a torch.Tensor"),
    (dict(query_y=torch.randint(0, 6, (3, 4))), ValueError, r"query_y has shape \[3, 4\]"),
    (dict(query_y=torch.full((3, 3), 6)), ValueError, r"query_y holds labels in \[6, 6\]"),
    (dict(query_y=torch.full((3, 3), -1)), ValueError, r"query_y holds labels in \[-1, -1\]"),
    (dict(query_y=torch.zeros(3, 3)), ValueError, r"query_y has dtype float32; loss='ce'"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(reduction=None), TypeError, r"reduction must be a str"),
    (dict(checkpoint=1), TypeError, r"checkpoint must be None, True or False"),
    (dict(lr=torch.ones(5, dtype=torch.float64)), ValueError, r"lr has shape \[5\]"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs(changes, error, match):
    with pytest.raises(error, match=match):
        mk.fast_weight_meta_loss(**bad(**changes))


def test_bad_mse_inputs():
    kwargs = make_meta_inputs(Case(loss="mse"), "A")
    with pytest.raises(ValueError, match=r"query_y has dtype int64; loss='mse' takes float"):
        mk.fast_weight_meta_loss(**dict(kwargs, query_y=torch.zeros(3, 3, 6, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"query_y has shape \[3, 3, 5\], expected \[3, 3, 6\]"):
        mk.fast_weight_meta_loss(**dict(kwargs, query_y=torch.zeros(3, 3, 5, dtype=torch.float64)))


def test_form_b_with_3d_x_needs_steps():
    kwargs = make_meta_inputs(Case(loss="mse"), "B")
    del kwargs["steps"]
    with pytest.raises(ValueError, match=r"steps is missing: x has shape \[3, 5, 7\].*query_x "
                                         r"has shape \[3, 4, 3, 7\]"):
        mk.fast_weight_meta_loss(**kwargs)
    kwargs["steps"] = 5  # T disagreeing with query_x's
    with pytest.raises(ValueError, match=r"query_x has shape \[3, 4, 3, 7\], expected .*\[3, 5, m, 7\]"):
        mk.fast_weight_meta_loss(**kwargs)
