"""metakernels.delta_rule: against flash-linear-attention's naive recurrence (the judge of
test_judges) and against metakernels.reference.delta_rule in float64, on outputs, the final state
and every gradient, with and without an initial state, on every backend here (the compiled
kernels' outputs NaN-poisoned by conftest); packed sequences (cu_seqlens) against the same
sequences run one by one; torch.compile(fullgraph=True) and opcheck; bad input; and, on a GPU,
against fla's chunk_delta_rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metakernels as mk
from conftest import COMPILED_BACKENDS, TOLERANCE, rel_err
from metakernels import reference
from metakernels.ops import unroll_path
from test_judges import fla_delta_rule_recurrence

BACKENDS = ["reference"] + COMPILED_BACKENDS
GRAD_NAMES = ("q", "k", "v", "beta", "initial_state")
needs_cpu = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="cpu backend not built")


def skip_unless_runs(backend, dtype=torch.float64, shape=None):
    """Triton in its interpreter (TRITON_INTERPRET=1) runs float32, not float64; the reference
    has no chunked path, so the size that exists for the cpu's (the last of SHAPES) is left to
    the compiled backends (it is the slowest case of the reference)."""
    if backend not in mk.available_backends("cpu", dtype):
        pytest.skip(f"backend {backend} does not run {dtype} on CPU tensors")
    if backend == "reference" and shape == SHAPES[-1]:
        pytest.skip("the chunked path's size: compiled backends only")


def make_inputs(batch, length, heads, d_k, d_v, *, dtype=torch.float64, state=True, seed=0,
                sequences=None, device="cpu"):
    """q, k (L2-normalised), v, β in (0, 1) in fla's [B, T, H, ·] layout and an initial state
    [N, H, K, V] (N = B, or ``sequences``), fresh random values, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": randn(batch, length, heads, d_k),
        "k": F.normalize(randn(batch, length, heads, d_k), dim=-1),
        "v": randn(batch, length, heads, d_v),
        "beta": torch.rand(batch, length, heads, generator=gen, dtype=torch.float64).sigmoid(),
    }
    if state:
        inputs["initial_state"] = randn(sequences or batch, heads, d_k, d_v)
    return {name: t.to(device=device, dtype=dtype).requires_grad_() for name, t in inputs.items()}


def run(inputs, cotangent_seed=7, **kwargs):
    """(o, final state, the gradients of q, k, v, β, initial state) of a random cotangent."""
    o, final = mk.delta_rule(**inputs, output_final_state=True, **kwargs)
    return outputs_and_grads(o, final, inputs, cotangent_seed)


def outputs_and_grads(o, final, inputs, cotangent_seed=7):
    gen = torch.Generator().manual_seed(cotangent_seed)
    cot_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    cot_final = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final)
    names = [n for n in GRAD_NAMES if n in inputs]
    grads = torch.autograd.grad([o, final], [inputs[n] for n in names], [cot_o, cot_final])
    return {"o": o, "final": final, **{f"grad_{n}": g for n, g in zip(names, grads)}}


def assert_close(got: dict, want: dict, tol: float, label=""):
    assert got.keys() == want.keys(), label
    for key, expected in want.items():
        err = rel_err(got[key], expected)
        assert err <= tol, f"{label} {key}: {err:.2e} > {tol:.0e}"


def run_fla_naive(inputs):
    """fla's naive recurrence on the same inputs (its layout is [B, H, T, ·]; it computes in
    float32 whatever the inputs and scales q by K^-½ itself)."""
    recurrence = fla_delta_rule_recurrence()
    q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))
    o, final = recurrence(q, k, v, inputs["beta"].transpose(1, 2),
                          initial_state=inputs.get("initial_state"))
    return outputs_and_grads(o.transpose(1, 2), final, inputs)


# Odd sizes; the last is the size where the cpu backend runs its chunked path (n = 1, m = 1,
# K ≥ 64, K·V ≥ 4096).
SHAPES = [(2, 19, 3, 7, 5), (1, 1, 1, 1, 1), (3, 5, 2, 1, 9), (1, 37, 2, 64, 64)]


@pytest.mark.parametrize("state", [True, False], ids=["initial_state", "zero_state"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fla_naive(backend, shape, dtype, state):
    """Outputs, final state and every gradient against fla's recurrence: float64 inputs within
    1e-5 of it (it computes in float32), float32 within 1e-4."""
    skip_unless_runs(backend, dtype, shape)
    inputs = make_inputs(*shape, dtype=dtype, state=state, seed=sum(shape))
    want = run_fla_naive(inputs)
    got = run(inputs, backend=backend)
    assert got["o"].dtype == dtype and got["final"].dtype == dtype
    assert_close(got, {k: w.to(dtype) for k, w in want.items()},
                 1e-5 if dtype == torch.float64 else 1e-4, f"{backend} {shape}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_recurrence(backend, shape, dtype):
    """Against metakernels.reference.delta_rule in float64 at the project's tolerances (float64
    1e-10, float32 1e-4), with a scale other than the default."""
    skip_unless_runs(backend, dtype, shape)
    inputs = make_inputs(*shape, seed=3 * sum(shape))
    o, final = reference.delta_rule(**inputs, scale=0.3, output_final_state=True)
    want = outputs_and_grads(o, final, inputs)
    cast = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    got = run(cast, scale=0.3, backend=backend)
    assert_close(got, want, TOLERANCE[dtype], f"{backend} {shape}")


@needs_cpu
def test_cpu_runs_chunked_path_at_delta_rule_sizes():
    """At K = V = 64 (the last of SHAPES) the cpu backend runs the delta rule chunked."""
    batch, length, heads, d = 1, 37, 2, 64
    tasks = batch * heads
    weight = torch.zeros(tasks, d, d, requires_grad=True)
    x = torch.randn(tasks, length, 1, d, requires_grad=True)
    assert unroll_path(weight, x, torch.randn(tasks, length, 1, d), torch.rand(tasks, length),
                       queries=torch.randn(tasks, length, 1, d, requires_grad=True),
                       backend="cpu") == "chunked"


def packed(inputs_per_sequence):
    """The sequences concatenated along T (B = 1), and their cu_seqlens."""
    lengths = [seq["q"].shape[1] for seq in inputs_per_sequence]
    cu = torch.tensor([0] + lengths).cumsum(0)
    joined = {n: torch.cat([seq[n].detach() for seq in inputs_per_sequence], 1).requires_grad_()
              for n in ("q", "k", "v", "beta")}
    joined["initial_state"] = torch.cat([seq["initial_state"].detach()
                                         for seq in inputs_per_sequence]).requires_grad_()
    return joined, cu


LENGTHS = [5, 0, 11, 1, 7]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_one_by_one(backend, dtype, index_dtype):
    """N sequences of different lengths (one empty) packed with cu_seqlens give each sequence's
    output, final state and gradients (for the same cotangents) as the sequence run alone."""
    skip_unless_runs(backend, dtype)
    heads, d_k, d_v = 3, 6, 5
    sequences = [make_inputs(1, length, heads, d_k, d_v, dtype=dtype, seed=10 + i)
                 for i, length in enumerate(LENGTHS)]
    joined, cu = packed(sequences)
    got = run(joined, cu_seqlens=cu.to(index_dtype), backend=backend)
    cot = outputs_cotangents(got)
    bounds = cu.tolist()
    alone = []
    for i, seq in enumerate(sequences):
        o, final = mk.delta_rule(**seq, output_final_state=True, backend=backend)
        if bounds[i] == bounds[i + 1]:  # T = 0 alone: no step, the state passes through
            assert o.shape == (1, 0, heads, d_v)
            assert torch.equal(final, seq["initial_state"])
        grads = torch.autograd.grad([o, final], [seq[n] for n in GRAD_NAMES],
                                    [cot["o"][:, bounds[i]:bounds[i + 1]], cot["final"][i:i + 1]],
                                    allow_unused=True)
        grads = [torch.zeros_like(seq[n]) if g is None else g for n, g in zip(GRAD_NAMES, grads)]
        alone.append({"o": o, "final": final,
                      **{f"grad_{n}": g for n, g in zip(GRAD_NAMES, grads)}})
    want = {key: torch.cat([a[key] for a in alone],
                           0 if key in ("final", "grad_initial_state") else 1)
            for key in got}
    assert_close(got, want, 1e-12 if dtype == torch.float64 else 1e-5, backend)


def outputs_cotangents(result, seed=7):
    """The cotangents `outputs_and_grads` drew for (o, final)."""
    gen = torch.Generator().manual_seed(seed)
    return {"o": torch.randn(result["o"].shape, generator=gen, dtype=torch.float64).to(result["o"]),
            "final": torch.randn(result["final"].shape, generator=gen,
                                 dtype=torch.float64).to(result["final"])}


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_against_reference_recurrence(backend):
    """The packed form against the reference recurrence over the same cu_seqlens, float64."""
    skip_unless_runs(backend, torch.float64)
    inputs = make_inputs(1, 24, 2, 5, 4, sequences=4, seed=4)
    cu = torch.tensor([0, 7, 7, 20, 24])
    o, final = reference.delta_rule(**inputs, cu_seqlens=cu, output_final_state=True)
    want = outputs_and_grads(o, final, inputs)
    assert_close(run(inputs, cu_seqlens=cu, backend=backend), want, 1e-10, backend)


@pytest.mark.parametrize("form", ["dense", "packed", "packed-no-state", "packed-host-copy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, form):
    """Under torch.compile(fullgraph=True) the op gives the eager outputs and gradients; the
    packed form's ragged layout stays inside its custom ops."""
    skip_unless_runs(backend, torch.float64)
    if form == "dense":
        inputs = make_inputs(2, 9, 2, 5, 3, seed=6)
        kwargs = {}
    else:
        inputs = make_inputs(1, 13, 2, 5, 3, sequences=3, seed=6, state=form != "packed-no-state")
        kwargs = {"cu_seqlens": torch.tensor([0, 4, 4, 13])}
        if form == "packed-host-copy":
            kwargs["cu_seqlens_cpu"] = kwargs["cu_seqlens"].clone()
    want = run(inputs, backend=backend, **kwargs)

    def call(**tensors):
        return mk.delta_rule(**tensors, output_final_state=True, backend=backend, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    o, final = compiled(**inputs)
    assert_close(outputs_and_grads(o, final, inputs), want, 1e-12, backend)


@needs_cpu
def test_opcheck_packed_ops():
    """torch.library.opcheck of the packed forward op (its fake, schema and autograd)."""
    inputs = make_inputs(1, 10, 2, 4, 3, sequences=3, seed=8)
    args = (*inputs.values(),)
    state = args[4]
    torch.library.opcheck(torch.ops.metakernels.delta_rule_packed_fwd.default,
                          (args[0], args[1], args[2], args[3], state,
                           torch.tensor([0, 3, 3, 10]), None, 0.5, "cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_no_final_state(backend):
    """B = 0 returns empty outputs; T = 0 returns the initial state; output_final_state=False
    returns None in its place."""
    skip_unless_runs(backend, torch.float64)
    empty = make_inputs(0, 4, 2, 3, 3)
    o, final = mk.delta_rule(**empty, output_final_state=True, backend=backend)
    assert o.shape == (0, 4, 2, 3) and final.shape == (0, 2, 3, 3)
    no_steps = make_inputs(2, 0, 2, 3, 4)
    o, final = mk.delta_rule(**no_steps, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 4) and torch.equal(final, no_steps["initial_state"])
    inputs = make_inputs(1, 3, 1, 2, 2, state=False)
    o, final = mk.delta_rule(**inputs, backend=backend)
    assert final is None and o.shape == (1, 3, 1, 2)


def test_non_contiguous_inputs():
    """Permuted (non-contiguous) inputs give the contiguous ones' results."""
    inputs = make_inputs(2, 6, 3, 4, 5, seed=2)
    want = run(inputs)
    strided = {n: (t.detach().movedim(-1, 0).contiguous().movedim(0, -1).requires_grad_())
               for n, t in inputs.items()}
    assert not strided["q"].is_contiguous()
    got = run(strided)
    assert_close(got, want, 1e-12)


def bad_calls():
    """(description, call arguments changed, exception, text the message must contain)."""
    f64 = torch.float64
    return [
        ("q not a tensor", dict(q=[1.0]), TypeError, "q must be"),
        ("q 3-D", dict(q=torch.zeros(2, 5, 7, dtype=f64)), ValueError, "q has shape"),
        ("k shape", dict(k=torch.zeros(2, 5, 3, 6, dtype=f64)), ValueError, "k has shape"),
        ("v shape", dict(v=torch.zeros(2, 4, 3, 5, dtype=f64)), ValueError, "v has shape"),
        ("beta shape", dict(beta=torch.zeros(2, 5, 3, 1, dtype=f64)), ValueError,
         "beta has shape"),
        ("k dtype", dict(k=torch.zeros(2, 5, 3, 7)), ValueError, "k has dtype"),
        ("int q", dict(q=torch.zeros(2, 5, 3, 7, dtype=torch.int64)), ValueError, "q has dtype"),
        ("scale type", dict(scale="big"), TypeError, "scale must be"),
        ("scale inf", dict(scale=float("inf")), ValueError, "scale must be finite"),
        ("state shape", dict(initial_state=torch.zeros(2, 3, 7, 4, dtype=f64)), ValueError,
         "initial_state has shape"),
        ("state dtype", dict(initial_state=torch.zeros(2, 3, 7, 5)), ValueError,
         "initial_state has dtype"),
        ("flag type", dict(output_final_state=1), TypeError, "output_final_state must be"),
        ("cu_seqlens with B > 1", dict(cu_seqlens=torch.tensor([0, 5])), ValueError,
         "cu_seqlens packs"),
        ("backend", dict(backend="gpu"), ValueError, "backend must be"),
    ]


@pytest.mark.parametrize("case", bad_calls(), ids=lambda c: c[0])
def test_bad_input(case):
    _, changes, error, text = case
    args = {k: t.detach() for k, t in make_inputs(2, 5, 3, 7, 5, seed=1).items()}
    args.update(changes)
    with pytest.raises(error, match=text):
        mk.delta_rule(**args)


@pytest.mark.parametrize("cu, text", [
    (torch.tensor([0.0, 5.0]), "cu_seqlens has dtype"),
    (torch.tensor([[0, 5]]), "cu_seqlens has shape"),
    (torch.tensor([0]), "cu_seqlens has shape"),
    (torch.tensor([0, 3, 2, 5]), "cu_seqlens holds"),
    (torch.tensor([1, 5]), "cu_seqlens holds"),
    (torch.tensor([0, 4]), "cu_seqlens holds"),
], ids=["float", "2-D", "no-sequence", "decreasing", "not-from-0", "not-to-T"])
def test_bad_cu_seqlens(cu, text):
    args = {k: t.detach() for k, t in make_inputs(1, 5, 2, 3, 3, sequences=cu.numel() - 1
                                                  if cu.dim() == 1 and cu.numel() > 1 else 1,
                                                  seed=1).items()}
    with pytest.raises(ValueError, match=text):
        mk.delta_rule(**args, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_cpu_is_read_instead(backend):
    """With cu_seqlens_cpu, the values are read from it (fla's argument): the same results."""
    skip_unless_runs(backend, torch.float64)
    inputs = make_inputs(1, 12, 2, 4, 3, sequences=3, seed=12)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    want = run(inputs, cu_seqlens=cu, backend=backend)
    assert_close(run(inputs, cu_seqlens=cu, cu_seqlens_cpu=cu.long(), backend=backend), want,
                 0.0, backend)


def test_bad_cu_seqlens_cpu():
    args = {k: t.detach() for k, t in make_inputs(1, 5, 2, 3, 3, sequences=2).items()}
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="cu_seqlens_cpu was given without cu_seqlens"):
        mk.delta_rule(**dict(args, initial_state=args["initial_state"][:1]), cu_seqlens_cpu=cu)
    with pytest.raises(ValueError, match="cu_seqlens_cpu is a int64 tensor of shape \\[2\\]"):
        mk.delta_rule(**args, cu_seqlens=cu, cu_seqlens_cpu=cu[:2])
    with pytest.raises(TypeError, match="cu_seqlens_cpu must be"):
        mk.delta_rule(**args, cu_seqlens=cu, cu_seqlens_cpu=[0, 2, 5])


def test_initial_state_count_must_match_sequences():
    args = {k: t.detach() for k, t in make_inputs(1, 5, 2, 3, 3, sequences=3).items()}
    with pytest.raises(ValueError, match=r"initial_state has shape \[3, 2, 3, 3\], expected "
                                         r"\[2, 2, 3, 3\]"):
        mk.delta_rule(**args, cu_seqlens=torch.tensor([0, 2, 5]))


# --- on a GPU: against fla's chunk_delta_rule --------------------------------------------------

GPU_BACKENDS = ["reference", "triton", "cuda"]


def _chunk_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError as error:
        pytest.skip(f"flash-linear-attention is not importable here ({error})")
    return chunk_delta_rule


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("packed_form", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_against_fla_chunk_delta_rule(backend, packed_form):
    """bfloat16 on CUDA (a float32 initial state, as fla's users pass it): this op and fla's
    chunk_delta_rule against the float64 reference on the same values (≤ 2e-2 each) and
    against each other (≤ 3e-2), on outputs, the final state and every gradient; the packed
    form with fla's cu_seqlens too (no empty sequence there: fla's tests have none; the
    float32 test below has one)."""
    if backend not in mk.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    chunk_delta_rule = _chunk_delta_rule()
    if packed_form:
        lengths = [100, 1, 300, 64]
        inputs = make_inputs(1, sum(lengths), 4, 64, 64, sequences=len(lengths), seed=21,
                             device="cuda")
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
        kwargs = {"cu_seqlens": cu}
    else:
        inputs = make_inputs(2, 200, 4, 64, 64, seed=21, device="cuda")
        kwargs = {}
    half = {n: t.detach().to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    half["initial_state"] = inputs["initial_state"].detach().float().requires_grad_()
    # The truth: the float64 reference on the same (rounded) values.
    rounded = {n: t.detach().double().requires_grad_() for n, t in half.items()}
    truth = run(rounded, backend="reference", **kwargs)
    o_fla, final_fla = chunk_delta_rule(**half, output_final_state=True, **kwargs)
    fla = outputs_and_grads(o_fla, final_fla, half)
    ours = run(half, backend=backend, **kwargs)
    assert ours["o"].dtype == torch.bfloat16 and ours["final"].dtype == torch.float32
    for key, want in truth.items():
        err, err_fla = rel_err(ours[key], want), rel_err(fla[key], want)
        assert err <= 2e-2, f"{key}: {err:.2e} (fla's: {err_fla:.2e})"
        assert rel_err(ours[key], fla[key]) <= 3e-2, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_float32_and_packed(backend):
    """float32 on CUDA against the float64 reference (≤ 1e-4), packed equal to one by one."""
    if backend not in mk.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    lengths = [33, 0, 129, 2]
    inputs = make_inputs(1, sum(lengths), 2, 64, 32, sequences=len(lengths), seed=5,
                         device="cuda")
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    truth = run(inputs, backend="reference", cu_seqlens=cu)
    cast = {n: t.detach().float().requires_grad_() for n, t in inputs.items()}
    assert_close(run(cast, backend=backend, cu_seqlens=cu), truth, 1e-4, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("packed_form", [False, True], ids=["dense", "packed-host-copy"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_call_without_host_syncs(backend, packed_form):
    """The forward and backward make no device-to-host synchronisation: without cu_seqlens, and
    with cu_seqlens given with its host copy (cu_seqlens_cpu; without it a packed call reads
    cu_seqlens once)."""
    if backend not in mk.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    if packed_form:
        cu_cpu = torch.tensor([0, 30, 31, 140])
        inputs = make_inputs(1, 140, 2, 64, 64, dtype=torch.bfloat16, sequences=3, seed=3,
                             device="cuda")
        kwargs = {"cu_seqlens": cu_cpu.cuda(), "cu_seqlens_cpu": cu_cpu}
    else:
        inputs = make_inputs(2, 70, 2, 64, 64, dtype=torch.bfloat16, seed=3, device="cuda")
        kwargs = {}
    cotangent = torch.randn(inputs["v"].shape, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, final = mk.delta_rule(**inputs, output_final_state=True, backend=backend, **kwargs)
        torch.autograd.backward([o, final], [cotangent, torch.ones_like(final)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t.grad).all() for t in inputs.values())
