"""The CUDA backend (metakernels._C_cuda, csrc/cuda/) on a GPU: outputs and every gradient
against the float64 reference on the same (rounded) inputs, in float32, bfloat16 and float16
(docs/conventions.md, accuracy: 1e-4 and 2e-2), both losses, both x forms, every lr form, readout,
first_order, odd sizes, n = 1, the global-memory path of shapes too big for shared memory,
non-contiguous inputs, B = 0, and against the Triton backend where it is available. Outputs are
NaN-poisoned (conftest). Skipped without a CUDA device."""

from __future__ import annotations

import contextlib

import pytest
import torch

import metakernels as mk
from conftest import (FEATURES, Case, assert_close, cast_inputs, make_inputs, rel_err,
                      run_unroll)
from metakernels.ops import _backends

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]



@pytest.fixture(autouse=True)
def cuda_backend_built():
    if _backends._module("cuda")[0] is None:
        pytest.fail(f"metakernels._C_cuda is not built: {_backends._module('cuda')[1]}")


def to_cuda(kwargs: dict) -> dict:
    return {k: v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
            else v for k, v in kwargs.items()}


def check_unroll(case: Case, dtype, seed: int = 0, other: str = "reference") -> None:
    """The CUDA backend in `dtype` against `other` in float64 on the same rounded inputs."""
    inputs = to_cuda(cast_inputs(make_inputs(case, torch.float64, seed), dtype))
    result = run_unroll(inputs, "cuda")
    for key, value in result.items():
        if value is not None:
            assert value.dtype == dtype and value.is_cuda, f"{key}: {value.dtype} {value.device}"
    if other == "reference":
        expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    else:
        expected = run_unroll(inputs, other)
    assert_close(result, expected, TOL[dtype], label=f"cuda vs {other} {case} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("per_step", [False, True], ids=["x3d", "x4d"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("features", range(len(FEATURES)))
def test_matches_reference(dtype, first_order, per_step, loss, features):
    case = Case(loss=loss, per_step=per_step, first_order=first_order, tasks=12, steps=6,
                support=9, d_in=61, d_out=37, **FEATURES[features])
    check_unroll(case, dtype, seed=features)


SIZES = [  # (B, T, n, d_in, d_out): ones, n = 1, odd, the benchmark tiles, a tall head
    (1, 1, 1, 1, 1),
    (5, 4, 1, 128, 128),     # delta-rule-like
    (3, 3, 7, 63, 65),
    (40, 10, 64, 128, 128),  # large-like: 98 KB of shared memory per CTA
    (6, 16, 16, 128, 128),   # trajectory-like
    (7, 5, 25, 64, 5),       # maml-ce-like
    (2, 3, 1, 129, 17),
    (3, 2, 5, 256, 240),     # W alone is 240 KB: the global-memory workspace path
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_sizes(dtype, loss, size):
    B, T, n, d_in, d_out = size
    for per_step in (False, True):
        case = Case(loss=loss, per_step=per_step, tasks=B, steps=T, support=n, d_in=d_in,
                    d_out=d_out, queries=3, weight="task", bias="shared", lr_form="full",
                    lr_scale=True, bias_lr_scale=True)
        check_unroll(case, dtype, seed=sum(size))


@pytest.mark.parametrize("lr_shape", [None, (), (1,), (4,), (3, 1), (1, 4), (3, 4)],
                         ids=lambda s: "float" if s is None else str(list(s)))
def test_every_lr_form_gets_its_gradient(lr_shape):
    inputs = make_inputs(Case(loss="ce", bias="task", queries=2, d_in=17, d_out=11))
    if lr_shape is not None:
        inputs["lr"] = (0.2 + 0.4 * torch.rand(lr_shape, dtype=torch.float64)).requires_grad_()
    expected = run_unroll(to_cuda(inputs), "reference")
    result = run_unroll(to_cuda(cast_inputs(inputs, torch.float32)), "cuda")
    assert_close(result, expected, TOL[torch.float32])
    if lr_shape is not None:
        assert result["grad_lr"].shape == torch.Size(lr_shape)


def test_first_order_is_fomaml():
    inputs = to_cuda(make_inputs(Case(first_order=True, weight="task"), torch.float32))
    out = mk.fast_weight_unroll(**inputs, backend="cuda")
    outer_grad = torch.randn_like(out.weight)
    grads = torch.autograd.grad(out.weight, [inputs["weight"], inputs["x"], inputs["y"]],
                                outer_grad, allow_unused=True)
    assert torch.equal(grads[0], outer_grad)
    assert grads[1] is None and grads[2] is None


def test_deterministic():
    case = Case(loss="ce", per_step=True, weight="task", bias="shared", lr_form="full",
                lr_scale=True, bias_lr_scale=True, queries=3, tasks=8, d_in=33, d_out=10)
    inputs = to_cuda(make_inputs(case, torch.float32))
    first, second = run_unroll(inputs, "cuda"), run_unroll(inputs, "cuda")
    for key in first:
        if first[key] is not None:
            assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_tasks(dtype):
    case = Case(tasks=0, bias="task", queries=2, lr_form="full", weight="shared")
    inputs = to_cuda(make_inputs(case, dtype))
    out = mk.fast_weight_unroll(**inputs, backend="cuda")
    assert out.weight.shape == (0, 7, 6) and out.bias.shape == (0, 6)
    assert out.losses.shape == (0, 4) and out.readout.shape == (0, 4, 2, 6)
    (grad_weight,) = torch.autograd.grad(out.weight.sum() + out.readout.sum(), inputs["weight"])
    assert torch.equal(grad_weight, torch.zeros(7, 6, dtype=dtype, device="cuda"))


def test_non_contiguous_inputs():
    case = Case(loss="mse", per_step=True, weight="task", bias="task", lr_form="full",
                lr_scale=True, queries=2, d_in=19, d_out=13)
    inputs = to_cuda(make_inputs(case, torch.float32))
    expected = run_unroll(inputs, "cuda")

    def strided(t):
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t.detach()
        return wide[..., ::2].requires_grad_(t.requires_grad)

    odd = {k: strided(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
           for k, v in inputs.items()}
    odd["weight"] = inputs["weight"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    result = run_unroll(odd, "cuda")
    assert_close(result, expected, 1e-6)


def test_runs_on_the_current_stream():
    """A call on a side stream gives the same answer as on the default stream."""
    case = Case(loss="ce", per_step=True, weight="task", bias="shared", queries=2, tasks=20)
    inputs = to_cuda(make_inputs(case, torch.float32))
    expected = run_unroll(inputs, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = run_unroll(inputs, "cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert_close(result, expected, 0.0)


def test_cuda_is_listed_first():
    assert mk.available_backends("cuda")[0] == "cuda"


@pytest.mark.skipif("triton" not in mk.available_backends("cuda"), reason="no triton backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_matches_triton(dtype, loss):
    case = Case(loss=loss, per_step=True, tasks=16, steps=8, support=16, d_in=64, d_out=64,
                queries=4, weight="task", bias="shared", lr_form="full", lr_scale=True,
                bias_lr_scale=True)
    check_unroll(case, dtype, seed=3, other="triton")


# --- the tensor-core path (csrc/cuda: unroll_*_mma_kernel) ------------------------------------

@contextlib.contextmanager
def mma_path(enabled: bool):
    """Run the block with the tensor-core kernels allowed (True) or off (False); yields the
    module, whose mma_launches() counts the tensor-core launches."""
    module = _backends._module("cuda")[0]
    before = module.mma_enabled()
    module.set_mma_enabled(enabled)
    try:
        yield module
    finally:
        module.set_mma_enabled(before)


def run_both_paths(inputs: dict) -> tuple[dict, dict, int]:
    """(tensor-core result, FMA result, tensor-core launches of the first) on the same inputs."""
    with mma_path(True) as module:
        start = module.mma_launches()
        fast = run_unroll(inputs, "cuda")
        torch.cuda.synchronize()
        launches = module.mma_launches() - start
    with mma_path(False) as module:
        start = module.mma_launches()
        plain = run_unroll(inputs, "cuda")
        assert module.mma_launches() == start, "METAKERNELS_CUDA_MMA off still launched mma"
    return fast, plain, launches


def check_both_paths(case: Case, dtype, seed: int, launches: int, only=None) -> dict:
    """Both paths against the float64 reference and each other; `launches` tensor-core kernels
    expected. `only` names the inputs that require grad (default: every floating one)."""
    inputs = to_cuda(cast_inputs(make_inputs(case, torch.float64, seed), dtype))
    if only is not None:
        inputs = {k: v.detach().requires_grad_(k in only) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v for k, v in inputs.items()}
    expected = run_unroll(cast_inputs(inputs, torch.float64), "reference")
    fast, plain, got_launches = run_both_paths(inputs)
    assert got_launches == launches, f"{got_launches} tensor-core launches, expected {launches}"
    assert_close(fast, expected, TOL[dtype], label=f"mma vs reference {case} {dtype}")
    assert_close(plain, expected, TOL[dtype], label=f"fma vs reference {case} {dtype}")
    assert_close(fast, plain, TOL[dtype], label=f"mma vs fma {case} {dtype}")
    return fast


MMA_SIZES = [  # (B, T, n, d_in, d_out, m, x per step), fragment-aligned unless noted
    (5, 4, 16, 32, 48, 16, True),
    (3, 3, 32, 64, 16, 0, False),
    (40, 10, 64, 128, 128, 0, False),  # large-like: up to 177 KB of shared memory (ce backward)
    (4, 12, 16, 128, 128, 16, True),   # trajectory-like
    (3, 4, 32, 64, 64, 16, False),     # strips of 2 tiles per warp
    (3, 3, 17, 32, 48, 16, True),      # n = 17: the FMA kernels under either setting
    (3, 3, 16, 40, 48, 16, False),     # d_in = 40: likewise
]
# float32 (3xTF32) on every size; bfloat16 and float16 (one TF32 product) on three.
MMA_CASES = ([(torch.float32, size) for size in MMA_SIZES]
             + [(dtype, MMA_SIZES[i]) for dtype in (torch.bfloat16, torch.float16)
                for i in (0, 2, 3)])


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("dtype,size", MMA_CASES,
                         ids=[f"{str(d)[6:]}-" + "x".join(map(str, s[:6])) for d, s in MMA_CASES])
def test_mma_matches_fma_and_reference(dtype, size, loss):
    """Every gradient wanted (x, y, lr, queries: one CTA per task in the backward, d_out split
    in mse's forward), bias with bias_lr_scale."""
    B, T, n, d_in, d_out, m, per_step = size
    case = Case(loss=loss, per_step=per_step, tasks=B, steps=T, support=n, d_in=d_in,
                d_out=d_out, queries=m, weight="task", bias="shared", lr_form="full",
                bias_lr_scale=True)
    aligned = all(v % 16 == 0 for v in (n, d_in, d_out, m))
    check_both_paths(case, dtype, seed=sum(size), launches=2 if aligned else 0)


SPLIT_CASES = [  # (dtype, first_order, differentiable inputs, (B, T, n, d_in, d_out, m))
    (torch.float32, False, ("weight",), (2, 6, 16, 32, 64, 16)),
    (torch.float32, True, ("weight", "bias", "y"), (2, 6, 16, 32, 64, 16)),
    (torch.float32, False, ("weight", "bias", "y"), (3, 5, 32, 128, 128, 0)),
    (torch.bfloat16, False, ("weight",), (3, 5, 32, 128, 128, 0)),
    (torch.bfloat16, False, ("weight", "bias", "y"), (2, 6, 16, 32, 64, 16)),
    (torch.float16, True, ("weight", "bias", "y"), (3, 5, 32, 128, 128, 0)),
]


@pytest.mark.parametrize("dtype,first_order,only,size", SPLIT_CASES,
                         ids=[f"{str(d)[6:]}-{'first' if f else 'second'}-{'-'.join(o)}-"
                              + "x".join(map(str, s)) for d, f, o, s in SPLIT_CASES])
def test_mma_split_columns(dtype, first_order, only, size):
    """mse without x, lr or queries gradients: d_out split over several CTAs per task (B is far
    below the SM count) in the backward too, the loss summed from per-CTA parts; deterministic."""
    B, T, n, d_in, d_out, m = size
    case = Case(loss="mse", per_step=True, tasks=B, steps=T, support=n, d_in=d_in, d_out=d_out,
                queries=m, weight="task", bias="task" if "bias" in only else None,
                lr_form="steps", bias_lr_scale="bias" in only, first_order=first_order)
    fast = check_both_paths(case, dtype, seed=sum(size), launches=2, only=only)
    inputs = to_cuda(cast_inputs(make_inputs(case, torch.float64, sum(size)), dtype))
    inputs = {k: v.detach().requires_grad_(k in only) if isinstance(v, torch.Tensor)
              and v.is_floating_point() else v for k, v in inputs.items()}
    again = run_unroll(inputs, "cuda")
    for key in fast:
        if fast[key] is not None:
            assert torch.equal(fast[key], again[key]), key


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_mma_forced_splits(splits):
    """set_mma_splits (a tuning knob) changes how d_out is split over CTAs, not the answer."""
    case = Case(loss="mse", per_step=False, tasks=40, steps=4, support=32, d_in=64, d_out=64,
                weight="shared", bias="shared", lr_form="scalar")
    module = _backends._module("cuda")[0]
    module.set_mma_splits(splits)
    try:
        check_both_paths(case, torch.float32, seed=splits, launches=2, only=("weight", "bias"))
    finally:
        module.set_mma_splits(0)


def test_mma_lr_scale_backward_takes_fma():
    """lr_scale: the forward on tensor cores, the backward on the FMA kernel, same answer."""
    case = Case(loss="mse", per_step=True, tasks=4, steps=5, support=16, d_in=32, d_out=32,
                queries=16, weight="task", bias="task", lr_form="full", lr_scale=True,
                bias_lr_scale=True)
    check_both_paths(case, torch.float32, seed=5, launches=1)


# --- linear_hvp ---------------------------------------------------------------------------------

def make_hvp_inputs(loss, tasks, support, d_in, d_out, shared, bias, v_bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).cuda()

    shapes = {None: None, "shared": (d_out,), "task": (tasks, d_out)}
    return dict(
        weight=randn(*((d_in, d_out) if shared else (tasks, d_in, d_out)), scale=d_in ** -0.5),
        x=randn(tasks, support, d_in), v=randn(tasks, d_in, d_out), loss=loss,
        bias=None if bias is None else randn(*shapes[bias]),
        v_bias=None if v_bias is None else randn(*shapes[v_bias]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("size", [(1, 1, 1, 1), (9, 7, 61, 37), (5, 64, 128, 128),
                                  (3, 700, 33, 50)],  # ce: 280 KB, the global-memory path
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", [("task", "task", False), ("shared", None, True),
                                  (None, None, False), (None, "shared", True)],
                         ids=["bias-vbias", "shared-bias", "no-bias", "v-bias-only"])
def test_linear_hvp(dtype, loss, size, form):
    bias, v_bias, shared = form
    inputs = make_hvp_inputs(loss, *size, shared=shared, bias=bias, v_bias=v_bias, seed=sum(size))
    low = {k: v.to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v
           for k, v in inputs.items()}
    ref = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
           for k, v in low.items()}
    got = mk.linear_hvp(**low, backend="cuda")
    want = mk.linear_hvp(**ref, backend="reference")
    assert (got[1] is None) == (want[1] is None)
    for g, w in zip(got, want):
        if w is not None:
            assert g.dtype == dtype and g.is_cuda
            assert rel_err(g, w) <= TOL[dtype]


def test_linear_hvp_zero_tasks():
    inputs = make_hvp_inputs("ce", 0, 5, 7, 6, shared=True, bias="shared", v_bias=None, seed=0)
    inputs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    hv_weight, hv_bias = mk.linear_hvp(**inputs, backend="cuda")
    assert hv_weight.shape == (0, 7, 6) and hv_bias.shape == (0, 6)
