"""Checkpointed unrolls (fast_weight_unroll(checkpoint=True), metakernels/ops): every input form
against the reference with T not a multiple of the segment length, what the forward keeps for
the backward, the checkpoint=None heuristic, and the custom ops under opcheck and torch.compile."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import metakernels as mk
from conftest import (COMPILED_BACKENDS, TOLERANCE, Case, assert_close, cast_inputs, make_inputs,
                      rel_err, run_unroll)
from metakernels.ops.fast_weight_unroll import checkpoint_segment, unroll_path

# The module (metakernels.ops re-exports the function under the same name).
unroll_module = importlib.import_module("metakernels.ops.fast_weight_unroll")

pytestmark = pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built")

FEATURES = [
    dict(weight="shared", bias=None, lr_form="float"),
    dict(weight="task", bias="shared", lr_form="full", lr_scale=True, bias_lr_scale=True,
         queries=3),
    dict(weight="shared", bias="task", lr_form="steps", bias_lr_scale=True, queries=2),
    dict(weight="task", bias=None, lr_form="tasks", lr_scale=True, queries=1),
]


def test_segment_is_ceil_sqrt():
    for steps in range(1, 300):
        assert checkpoint_segment(steps) == math.ceil(math.sqrt(steps))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("features", range(len(FEATURES)))
def test_matches_reference(backend, first_order, per_step, loss, features):
    """T = 7: segments of 3, 3 and 1 steps."""
    case = Case(loss=loss, per_step=per_step, first_order=first_order, steps=7,
                **FEATURES[features])
    inputs = make_inputs(case, seed=features)
    assert unroll_path(**inputs, backend=backend, checkpoint=True).endswith("+ checkpoint(3)")
    expected = run_unroll(inputs, "reference")
    assert_close(run_unroll(dict(inputs, checkpoint=True), backend), expected,
                 TOLERANCE[torch.float64], label=f"{backend} {case}")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 10, 17])
def test_float32_and_step_counts(backend, steps):
    """float32, against the float64 reference; T = 1 (one segment), 2, 10 (4 + 4 + 2), 17."""
    case = Case(per_step=True, steps=steps, weight="task", bias="task", lr_form="full",
                queries=2, d_in=33, d_out=10)
    inputs = make_inputs(case, torch.float32, seed=steps)
    expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    assert_close(run_unroll(dict(inputs, checkpoint=True), backend), expected,
                 TOLERANCE[torch.float32])


def saved_tensor_sizes(kwargs: dict) -> set[torch.Size]:
    """The shapes of the tensors autograd keeps for the backward of one call, besides the
    inputs themselves."""
    inputs = {v.data_ptr() for v in kwargs.values() if isinstance(v, torch.Tensor)}
    shapes = set()

    def pack(t):
        if t.data_ptr() not in inputs:
            shapes.add(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mk.fast_weight_unroll(**kwargs, backend=COMPILED_BACKENDS[0])
    return shapes


def test_keeps_only_segment_starts():
    """Store-every-step keeps W_t [B, T, d_in, d_out] and E_t [B, T, n, d_out]; checkpointed,
    the forward keeps the ⌈T/⌈√T⌉⌉ − 1 later segment starts, [S − 1, B, d_in, d_out] and
    [S − 1, B, d_out], and nothing per step."""
    B, T, n, d_in, d_out = 2, 20, 3, 6, 5
    case = Case(per_step=True, tasks=B, steps=T, support=n, d_in=d_in, d_out=d_out,
                weight="task", bias="task", queries=2)
    inputs = make_inputs(case)
    stored = saved_tensor_sizes(dict(inputs, checkpoint=False))
    assert {torch.Size([B, T, d_in, d_out]), torch.Size([B, T, n, d_out])} <= stored
    # (lr, given as a float, becomes a [B, T] tensor that both keep.)
    kept = saved_tensor_sizes(dict(inputs, checkpoint=True)) - {torch.Size([B, T])}
    assert kept == {torch.Size([3, B, d_in, d_out]), torch.Size([3, B, d_out])}


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backward_recomputes_sub_segments(backend, monkeypatch):
    """Where the backward needs W_t (the queries' gradient), a segment of L steps is recomputed
    in sub-segments of ⌈√L⌉: with T = 30 (segments of 6), no kernel call stores the W_t of more
    than 3 steps at once; the gradients equal store-every-step's."""
    case = Case(per_step=True, tasks=2, steps=30, support=3, d_in=6, d_out=5, weight="task",
                bias="task", lr_form="full", queries=2)
    inputs = make_inputs(case, seed=4)
    expected = run_unroll(dict(inputs, checkpoint=False), backend)
    real = unroll_module._backends.kernels
    stored_steps = []

    class Recorder:
        def __init__(self, module):
            self.module = module

        def unroll_forward(self, *args):
            if args[-1]:  # store_states
                stored_steps.append(args[3].shape[1])
            return self.module.unroll_forward(*args)

        def unroll_backward(self, *args):
            return self.module.unroll_backward(*args)

    monkeypatch.setattr(unroll_module._backends, "kernels", lambda name: Recorder(real(name)))
    result = run_unroll(dict(inputs, checkpoint=True), backend)
    assert stored_steps and max(stored_steps) == 3
    assert_close(result, expected, 1e-12)


def test_default_heuristic(monkeypatch):
    """checkpoint=None checkpoints when the per-step saved tensors pass CHECKPOINT_BYTES, and
    never without a gradient or on the reference backend."""
    backend = COMPILED_BACKENDS[0]
    inputs = make_inputs(Case(per_step=True, steps=9, queries=2))
    assert "checkpoint" not in unroll_path(**inputs, backend=backend)
    # Per step the backward would keep W_t (d_in·d_out) and E_t (n·d_out) per task, float64.
    per_call = 3 * 9 * (7 * 6 + 5 * 6) * 8
    monkeypatch.setattr(unroll_module, "CHECKPOINT_BYTES", per_call - 1)
    assert unroll_path(**inputs, backend=backend).endswith("+ checkpoint(3)")
    assert "checkpoint" not in unroll_path(**inputs, backend=backend, checkpoint=False)
    assert unroll_path(**inputs, backend="reference") == "reference"
    with torch.no_grad():
        assert "checkpoint" not in unroll_path(**inputs, backend=backend)
    monkeypatch.setattr(unroll_module, "CHECKPOINT_BYTES", per_call)
    assert "checkpoint" not in unroll_path(**inputs, backend=backend)


def test_bad_checkpoint_argument():
    inputs = make_inputs(Case())
    with pytest.raises(TypeError, match="checkpoint"):
        mk.fast_weight_unroll(**inputs, checkpoint="yes")


def ckpt_args(seed=5):
    case = Case(loss="ce", per_step=True, weight="task", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, queries=2, tasks=2, steps=5)
    kwargs = make_inputs(case, seed=seed)
    lr = kwargs["lr"].detach().requires_grad_()
    return (kwargs["weight"], kwargs["x"], kwargs["y"], lr, kwargs["bias"], kwargs["lr_scale"],
            kwargs["bias_lr_scale"], kwargs["queries"], 1, False, 3, "cpu")


@pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="the cpu backend is not built")
def test_opcheck_ops():
    args = ckpt_args()
    torch.library.opcheck(torch.ops.metakernels.fast_weight_unroll_ckpt_fwd.default, args)
    with torch.no_grad():
        weight_t, bias_t, _, readout, starts_w, starts_b = \
            torch.ops.metakernels.fast_weight_unroll_ckpt_fwd(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]]
    torch.library.opcheck(
        torch.ops.metakernels.fast_weight_unroll_ckpt_bwd.default,
        (*detached, starts_w, starts_b, torch.randn_like(weight_t), torch.randn_like(bias_t),
         torch.randn_like(readout), 1, False, [True, True, False, True, True, True, True, True],
         3, "cpu"),
        test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_torch_compile(backend):
    """A checkpointed meta-step compiled with fullgraph=True gives the eager meta-gradient."""
    kwargs = make_inputs(Case(per_step=True, steps=6, bias="shared", lr_form="full", queries=2),
                         seed=3)

    def meta_step(weight, bias, x, y, lr, queries):
        out = mk.fast_weight_unroll(weight, x, y, lr, bias=bias, queries=queries,
                                    backend=backend, checkpoint=True)
        return out.readout.pow(2).sum() + out.weight.pow(2).sum()

    args = [kwargs[k] for k in ("weight", "bias", "x", "y", "lr", "queries")]
    compiled = torch.compile(meta_step, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(meta_step(*args), args)
    got = torch.autograd.grad(compiled(*args), args)
    for g, e in zip(got, eager):
        assert rel_err(g, e) < 1e-12
    reference = mk.fast_weight_unroll(args[0], args[2], args[3], args[4], bias=args[1],
                                      queries=args[5], backend="reference")
    want = torch.autograd.grad(reference.readout.pow(2).sum() + reference.weight.pow(2).sum(),
                               args)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_unused_outputs(backend):
    """Only the readout is used (no adjoint for W_T or b_T): the chained adjoints start at 0."""
    inputs = make_inputs(Case(per_step=True, steps=8, bias="task", queries=2, weight="task",
                              lr_form="full"))
    got = mk.fast_weight_unroll(**inputs, backend=backend, checkpoint=True)
    want = mk.fast_weight_unroll(**inputs, backend="reference")
    leaves = [inputs[k] for k in ("weight", "bias", "x", "queries", "lr")]
    for g, w in zip(torch.autograd.grad(got.readout.sum(), leaves, allow_unused=True),
                    torch.autograd.grad(want.readout.sum(), leaves, allow_unused=True)):
        assert rel_err(g, w) < 1e-10


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_task_strided_inputs(backend, per_step, loss):
    """x and y whose tasks are strided (every other task of a larger batch, as the segments'
    step slices are), read in place by the kernels: the same results as dense copies."""
    case = Case(loss=loss, per_step=per_step, steps=4, weight="task", bias="task",
                lr_form="full", queries=2)
    inputs = make_inputs(case, seed=8)
    strided = {}
    for name in ("x", "y"):
        dense = inputs[name].detach()
        wide = torch.stack([dense, torch.full_like(dense, -7)], 1).flatten(0, 1)
        strided[name] = wide[::2]
        assert not strided[name].is_contiguous() and torch.equal(strided[name], dense)
        if name == "x":
            strided[name].requires_grad_()
    expected = run_unroll(dict(inputs, x=inputs["x"].detach().requires_grad_(),
                               y=inputs["y"].detach()), backend)
    assert_close(run_unroll(dict(inputs, **strided), backend), expected, 1e-12)
