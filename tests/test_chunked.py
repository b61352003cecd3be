"""The chunked (WY/UT) form of fast_weight_unroll (mse, 4-D x): its plain-PyTorch reference
(metakernels/reference/fast_weight_chunked.py) against the step-by-step reference and
flash-linear-attention's naive delta rule, its written-out backward against autograd, and the
cpu backend's chunked path against the float64 reference, with its outputs NaN-poisoned."""

from __future__ import annotations

import contextlib

import pytest
import torch

import metakernels as mk
from conftest import (COMPILED_BACKENDS, TOLERANCE, Case, assert_close, cast_inputs, cotangents,
                      differentiable, make_inputs, rel_err, run_unroll)
from metakernels.ops import unroll_path
from metakernels.reference import fast_weight_chunked as chunked
from test_judges import fla_delta_rule_recurrence

needs_cpu = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="cpu backend not built")

# (n, d_in, d_out, T, chunk steps): T not a multiple of C, T < C, n = 1, 3, 16, d = 1, 63, 65, 129.
SHAPES = [
    (1, 7, 5, 13, 4),
    (3, 6, 4, 9, 16),       # T < C
    (16, 5, 3, 7, 3),
    (1, 1, 1, 10, 3),
    (1, 63, 65, 11, 5),
    (3, 65, 63, 6, 4),
    (1, 129, 7, 9, 8),
]
# The optional inputs the chunked path accepts, mixed.
FORMS = [
    dict(weight="shared", bias=None, lr_form="full", queries=1),
    dict(weight="task", bias="shared", lr_form="full", queries=7),
    dict(weight="shared", bias="task", lr_form="steps", queries=0),
    dict(weight="task", bias="task", lr_form="float", queries=3, first_order=True),
]


def chunk_case(shape, form, tasks=3) -> Case:
    n, d_in, d_out, steps, _ = shape
    return Case(loss="mse", per_step=True, tasks=tasks, steps=steps, support=n, d_in=d_in,
                d_out=d_out, **form)


def reference_lr(inputs) -> torch.Tensor:
    """lr as the ops pass it on: a [B, T] tensor."""
    tasks, steps = inputs["x"].shape[:2]
    lr = inputs["lr"]
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(lr, dtype=inputs["weight"].dtype)
    return lr.broadcast_to(tasks, steps)


def run_chunked_reference(inputs, chunk):
    """run_unroll's outputs and gradients, through the chunked reference by autograd."""
    out = chunked.fast_weight_unroll_chunked(
        inputs["weight"], inputs["x"], inputs["y"], reference_lr(inputs),
        bias=inputs.get("bias"), queries=inputs.get("queries"),
        first_order=inputs["first_order"], chunk=chunk)
    return mk.UnrollOutput(*out)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_step_reference(shape, form):
    inputs = make_inputs(chunk_case(shape, form), seed=sum(shape))
    want = run_unroll(inputs, "reference")
    out = run_chunked_reference(inputs, shape[-1])
    got = {"weight": out.weight, "bias": out.bias, "losses": out.losses, "readout": out.readout}
    pairs = [(t, g) for t, g in zip((out.weight, out.bias, out.readout), cotangents(out))
             if t is not None]
    leaves = differentiable(inputs)
    grads = torch.autograd.grad([t for t, _ in pairs], list(leaves.values()),
                                [g for _, g in pairs], allow_unused=True)
    got.update({f"grad_{k}": g for k, g in zip(leaves, grads)})
    if inputs["first_order"]:  # no gradient reaches x or y in first order
        for name in ("grad_x", "grad_y"):
            got[name] = torch.zeros_like(inputs[name[5:]]) if got[name] is None else got[name]
            want[name] = torch.zeros_like(inputs[name[5:]]) if want[name] is None else want[name]
    assert_close(got, want, 1e-10, f"{shape}")


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_written_out_backward_matches_autograd(shape, form):
    """chunked_backward (the algorithm the kernels run) against autograd through the chunked
    reference, every gradient."""
    inputs = make_inputs(chunk_case(shape, form), seed=3 + sum(shape))
    lr = reference_lr(inputs).detach().clone().requires_grad_(True)
    out = run_chunked_reference(dict(inputs, lr=lr), shape[-1])
    gen = torch.Generator().manual_seed(11)
    adj = [None if t is None else torch.randn(t.shape, generator=gen, dtype=t.dtype)
           for t in (out.weight, out.bias, out.readout)]
    names = ["weight", "x", "y", "lr", "bias", "queries"]
    leaves = {"weight": inputs["weight"], "x": inputs["x"], "y": inputs["y"], "lr": lr,
              "bias": inputs.get("bias"), "queries": inputs.get("queries")}
    present = [k for k in names if leaves[k] is not None]
    pairs = [(t, a) for t, a in zip((out.weight, out.bias, out.readout), adj) if t is not None]
    want = torch.autograd.grad([t for t, _ in pairs], [leaves[k] for k in present],
                               [a for _, a in pairs], allow_unused=True)
    got = chunked.chunked_backward(
        inputs["weight"].detach(), inputs["x"].detach(), inputs["y"].detach(), lr.detach(),
        None if inputs.get("bias") is None else inputs["bias"].detach(),
        None if inputs.get("queries") is None else inputs["queries"].detach(),
        adj[0], adj[1], adj[2], first_order=inputs["first_order"], chunk=shape[-1])
    for name, expected in zip(present, want):
        if expected is None:  # first order: x and y get nothing
            assert got[name] is None, name
            continue
        assert rel_err(got[name], expected) < 1e-10, name


def fla_inputs(batch, heads, length, d_k, d_v, seed):
    """q, k (normalised), v, β, S_0 in fla's [B, H, T, ·] layout, float64."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, d_k, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(
        torch.randn(batch, heads, length, d_k, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, heads, length, d_v, generator=gen, dtype=torch.float64)
    beta = torch.rand(batch, heads, length, generator=gen, dtype=torch.float64).sigmoid()
    state0 = torch.randn(batch, heads, d_k, d_v, generator=gen, dtype=torch.float64)
    return q, k, v, beta, state0


def test_reference_matches_fla_naive_delta_rule():
    """At n = 1 without bias the chunked form is fla's delta rule (as test_judges holds the op)."""
    recurrence = fla_delta_rule_recurrence()
    batch, heads, length, d_k, d_v = 2, 3, 19, 7, 5
    q, k, v, beta, state0 = fla_inputs(batch, heads, length, d_k, d_v, seed=5)
    o_fla, state_fla = recurrence(q, k, v, beta, initial_state=state0)
    tasks = batch * heads
    weight_t, _, _, readout = chunked.fast_weight_unroll_chunked(
        state0.reshape(tasks, d_k, d_v), k.reshape(tasks, length, 1, d_k),
        v.reshape(tasks, length, 1, d_v), beta.reshape(tasks, length),
        queries=(q * d_k ** -0.5).reshape(tasks, length, 1, d_k), chunk=4)
    # fla's recurrence computes in float32 whatever its inputs: test_judges' tolerances.
    assert rel_err(readout.reshape(o_fla.shape), o_fla) < 1e-5
    assert rel_err(weight_t.reshape(state_fla.shape), state_fla) < 1e-5


# --- the cpu backend's chunked path ---------------------------------------------------------------

@contextlib.contextmanager
def chunked_knobs(force: int, rows: int = 32):
    """Force the cpu chunked path on (1) or off (0), chunks of max(1, rows // n) steps."""
    from metakernels.ops import _backends
    module = _backends.kernels("cpu")
    module.set_chunked_knobs(force, rows)
    try:
        yield
    finally:
        module.set_chunked_knobs(-1, 32)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_chunked_matches_reference(shape, form, dtype):
    n, chunk = shape[0], shape[-1]
    inputs = make_inputs(chunk_case(shape, form), seed=sum(shape) + 1)
    want = run_unroll(inputs, "reference")
    cast = cast_inputs(inputs, dtype)
    with chunked_knobs(1, rows=chunk * n):
        path = unroll_path(**cast, backend="cpu")
        got = run_unroll(cast, "cpu")
    assert path == "chunked", path
    assert_close(got, want, TOLERANCE[dtype], f"{shape} {dtype}")


@needs_cpu
@pytest.mark.parametrize("form", FORMS[:2], ids=["plain", "bias"])
def test_cpu_chunked_checkpointed(form):
    shape = (1, 9, 8, 23, 4)
    inputs = make_inputs(chunk_case(shape, form), seed=2)
    want = run_unroll(inputs, "reference")
    with chunked_knobs(1, rows=4):
        path = unroll_path(**inputs, backend="cpu", checkpoint=True)
        out = mk.fast_weight_unroll(**inputs, backend="cpu", checkpoint=True)
        pairs = [(t, g) for t, g in zip((out.weight, out.bias, out.readout), cotangents(out))
                 if t is not None]
        leaves = differentiable(inputs)
        grads = torch.autograd.grad([t for t, _ in pairs], list(leaves.values()),
                                    [g for _, g in pairs], allow_unused=True)
    assert path == "chunked + checkpoint(5)", path
    got = {"weight": out.weight, "bias": out.bias, "losses": out.losses, "readout": out.readout}
    got.update({f"grad_{k}": g for k, g in zip(leaves, grads)})
    assert_close(got, want, 1e-10)


@needs_cpu
def test_cpu_chunked_against_fla_naive_delta_rule():
    """The delta rule by the cpu chunked path (default knobs) against fla's recurrence."""
    recurrence = fla_delta_rule_recurrence()
    batch, heads, length, d_k, d_v = 2, 2, 70, 64, 64
    q, k, v, beta, state0 = fla_inputs(batch, heads, length, d_k, d_v, seed=9)
    for t in (q, k, v, beta, state0):
        t.requires_grad_()
    o_fla, state_fla = recurrence(q, k, v, beta, initial_state=state0)
    cot_o, cot_state = torch.randn_like(o_fla), torch.randn_like(state_fla)
    grads_fla = torch.autograd.grad([o_fla, state_fla], [q, k, v, beta, state0],
                                    [cot_o, cot_state])
    tasks = batch * heads
    args = (state0.reshape(tasks, d_k, d_v), k.reshape(tasks, length, 1, d_k),
            v.reshape(tasks, length, 1, d_v), beta.reshape(tasks, length))
    queries = (q * d_k ** -0.5).reshape(tasks, length, 1, d_k)
    assert unroll_path(*args, queries=queries, backend="cpu") == "chunked"
    out = mk.fast_weight_unroll(*args, queries=queries, backend="cpu")
    o, state = out.readout.reshape(o_fla.shape), out.weight.reshape(state_fla.shape)
    assert rel_err(o, o_fla) < 1e-5  # fla's recurrence computes in float32
    assert rel_err(state, state_fla) < 1e-5
    grads = torch.autograd.grad([o, state], [q, k, v, beta, state0], [cot_o, cot_state])
    for name, got, want in zip(["q", "k", "v", "beta", "initial_state"], grads, grads_fla):
        assert rel_err(got, want) < 1e-4, name


@needs_cpu
def test_path_switch():
    """The chunked path runs just inside its conditions and not just outside them: the size
    rule without stored states (the init's meta-gradient; the forward always) and with them
    (x's or the queries' gradient wanted, where the step loop would store W_t)."""
    def path(case, states=True, **overrides):
        inputs = make_inputs(case, seed=4)
        inputs.update(overrides)
        if not states:
            for name in ("x", "queries"):
                if isinstance(inputs.get(name), torch.Tensor):
                    inputs[name].requires_grad_(False)
        return unroll_path(**inputs, backend="cpu")

    def case(**changes):
        base = dict(per_step=True, tasks=2, steps=2, support=1, d_in=64, d_out=64, queries=2,
                    bias="shared")
        return Case(**{**base, **changes})

    # Without stored states: n = 1, m ≤ 2, d_in ≥ 64, d_in·d_out ≥ 4096, T ≥ 2.
    assert path(case(), states=False) == "chunked"
    assert path(case(support=2), states=False) == "steps"
    assert path(case(queries=3), states=False) == "steps"
    assert path(case(d_in=63, d_out=70), states=False) == "steps"
    assert path(case(d_out=63), states=False) == "steps"
    assert path(case(steps=1), states=False) == "steps"
    # With them: the forward by the rule above, the backward for n ≤ 8, 8n ≤ d_in,
    # d_in·d_out ≥ 1024, any T (checkpointed segments take it down to one step).
    assert path(case()) == "chunked"
    assert path(case(support=2)) == "steps/chunked"
    wide = dict(support=8, d_in=64, d_out=16, queries=2)
    assert path(case(**wide)) == "steps/chunked"
    assert path(case(**{**wide, "support": 9, "d_in": 80})) == "steps"
    assert path(case(**{**wide, "d_in": 63})) == "steps"
    assert path(case(**{**wide, "d_out": 15})) == "steps"
    assert path(case(steps=1)) == "steps/chunked"
    # Outside the exact conditions.
    assert path(case(loss="ce")) == "steps"
    assert path(case(lr_scale=True)) == "steps"
    assert "chunked" not in path(case(per_step=False))  # 3-D x: the Gram path or the loop
    ones = torch.ones(64, dtype=torch.float64)
    # bias_lr_scale all ones is exact; ops cannot see its values, so the forward stores W_t.
    assert path(case(), bias_lr_scale=ones) == "steps/chunked"
    with torch.no_grad():
        assert path(case(), bias_lr_scale=ones) == "chunked"
    assert path(case(), bias_lr_scale=ones.clone().requires_grad_()) == "steps"
    assert path(case(), bias_lr_scale=torch.full((64,), 1.5, dtype=torch.float64)) == "steps"
    with chunked_knobs(0):
        assert path(case()) == "steps"
    with chunked_knobs(1):
        assert path(case(support=3), states=False) == "chunked"
        assert path(case(lr_scale=True)) == "steps"


# --- numerics: float32 over long unrolls ----------------------------------------------------------

def delta_rule_inputs(tasks, steps, n, d, step_size, seed=0):
    """Normalised keys (‖x‖ = 1) with η ‖x‖² = step_size · U(0.5, 1), queries, m = 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(
        torch.randn(tasks, steps, n, d, generator=gen, dtype=torch.float64), dim=-1)
    return dict(
        weight=torch.randn(d, d, generator=gen, dtype=torch.float64) * d ** -0.5,
        x=x, y=torch.randn(tasks, steps, n, d, generator=gen, dtype=torch.float64),
        lr=step_size * n * (0.5 + 0.5 * torch.rand(tasks, steps, generator=gen,
                                                   dtype=torch.float64)),
        queries=torch.randn(tasks, steps, 1, d, generator=gen, dtype=torch.float64) * d ** -0.5,
        loss="mse", first_order=False)


def float32_errors(inputs, force: int) -> dict:
    """The float32 cpu run (path forced) against the float64 reference, error per output."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            value.requires_grad_(True)
    want = run_unroll(inputs, "reference")
    cast = cast_inputs(inputs, torch.float32)
    with chunked_knobs(force):
        got = run_unroll(cast, "cpu")
    return {k: rel_err(got[k], want[k]) for k in want if want[k] is not None}


@needs_cpu
@pytest.mark.parametrize("steps", [64, 1024])
def test_float32_long_unroll_normalised_keys(steps):
    """the float32 tolerance of docs/conventions.md holds up to T = 1024 with η‖x‖² ≤ 1 (the delta
    rule's regime)."""
    inputs = delta_rule_inputs(2, steps, 1, 32, 1.0, seed=steps)
    errors = float32_errors(inputs, 1)
    assert max(errors.values()) < TOLERANCE[torch.float32], errors


@needs_cpu
def test_torch_compile_takes_the_chunked_path():
    """A meta-step on the chunked path compiled with fullgraph=True (the size rule is a constant
    for dynamo) gives the float64 reference's meta-gradient."""
    inputs = make_inputs(chunk_case((1, 64, 64, 9, 0), dict(bias="shared", lr_form="full",
                                                           queries=1)), seed=6)
    args = [inputs[k] for k in ("weight", "bias", "x", "y", "lr", "queries")]
    assert unroll_path(**inputs, backend="cpu") == "chunked"

    def meta_step(backend, weight, bias, x, y, lr, queries):
        out = mk.fast_weight_unroll(weight, x, y, lr, bias=bias, queries=queries, backend=backend)
        return out.readout.pow(2).sum() + out.weight.pow(2).sum()

    compiled = torch.compile(meta_step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled("cpu", *args), args)
    want = torch.autograd.grad(meta_step("reference", *args), args)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


@needs_cpu
def test_checkpointed_segment_of_one_expanded_step():
    """A checkpointed segment of one step sliced from an x expanded over T has step stride 0;
    it still takes the chunked backward the call was planned for (found by test_properties)."""
    case = chunk_case((1, 64, 64, 3, 0), dict(bias=None, lr_form="float"), tasks=1)
    inputs = make_inputs(case, seed=0)
    inputs["x"] = inputs["x"].detach()[:, :1].expand(1, 3, 1, 64).requires_grad_()
    inputs["weight"].requires_grad_(False)
    inputs["y"].requires_grad_(False)
    assert unroll_path(**inputs, backend="cpu", checkpoint=True) == "chunked + checkpoint(2)"
    out = mk.fast_weight_unroll(**inputs, backend="cpu", checkpoint=True)
    got = torch.autograd.grad(out.weight.sum(), inputs["x"])[0]
    ref = mk.fast_weight_unroll(**inputs, backend="reference")
    assert rel_err(got, torch.autograd.grad(ref.weight.sum(), inputs["x"])[0]) < 1e-10
