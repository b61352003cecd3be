"""The Triton backend against the float64 reference (docs/ops/fast_weight_unroll.md,
docs/ops/linear_hvp.md and docs/conventions.md).

Two halves:
- interpreter tests (CPU tensors, float32 and float16, tiny odd shapes) run only with
  ``TRITON_INTERPRET=1`` set before Triton is imported: ``make test-triton`` runs this file so.
  They are skipped in the plain pytest run.
- ``gpu`` tests at the shapes of the standard configurations (docs/conventions.md), scaled, in
  float32, bfloat16 and float16 on a CUDA device, and against backend "cuda" where it is built.
  Skipped without CUDA or in the interpreter.

Every output of the Triton kernels starts as NaN (conftest's autouse fixture), so an unwritten
element fails. The reference runs in float64 on the inputs rounded to the tested dtype, so the
tolerance measures the kernels' own error, not the inputs' rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

import metakernels as mk  # noqa: E402
from conftest import (Case, TOLERANCE, assert_close, cast_inputs, make_inputs,  # noqa: E402
                      rel_err, run_unroll)
from metakernels.ops import _backends  # noqa: E402

INTERPRETER = _backends.triton_interpreter()
interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="interpreter tests: run with TRITON_INTERPRET=1 (make test-triton)")
HALF_TOLERANCE = 2e-2  # docs/conventions.md, accuracy, bfloat16 / float16


def rounded_reference(inputs: dict, dtype, device="cpu") -> tuple[dict, dict]:
    """(inputs in ``dtype`` on ``device``, the reference's outputs and gradients in float64 on the
    same rounded values)."""
    low = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            floating = value.is_floating_point()
            value_low = value.detach().to(device=device, dtype=dtype if floating else value.dtype)
            value = value_low.requires_grad_(value.requires_grad)
        low[key] = value
    return low, run_unroll(cast_inputs(low, torch.float64), "reference")


def check_unroll(case: Case, dtype, device="cpu", tol=None, seed=0, grad_of=None,
                 backend="triton") -> dict:
    """Run ``case`` on ``backend`` and assert outputs and every gradient against the reference.
    ``grad_of``: the inputs that require grad (default: every differentiable one)."""
    inputs = make_inputs(case, torch.float64, seed=seed)
    if grad_of is not None:
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and key not in grad_of:
                value.requires_grad_(False)
    low, expected = rounded_reference(inputs, dtype, device)
    result = run_unroll(low, backend)
    for key, value in result.items():
        if value is not None:
            assert value.dtype == dtype and value.device.type == torch.device(device).type, key
    if tol is None:
        tol = TOLERANCE[dtype] if dtype == torch.float32 else HALF_TOLERANCE
    assert_close(result, expected, tol, label=f"{case} {dtype}")
    return result


# --- interpreter: every input form at tiny odd shapes --------------------------------------------

CASES = {
    "mse-3d": Case(),
    "ce-3d": Case(loss="ce", lr_form="scalar"),
    "mse-4d-task-all": Case(per_step=True, weight="task", bias="task", lr_form="full",
                            lr_scale=True, bias_lr_scale=True, queries=3),
    "ce-4d-shared-all": Case(loss="ce", per_step=True, bias="shared", lr_form="steps",
                             lr_scale=True, bias_lr_scale=True, queries=2),
    "mse-3d-readout-bias": Case(tasks=2, bias="shared", queries=4, lr_form="tasks",
                                lr_scale=True),
    "ce-3d-task-readout": Case(loss="ce", weight="task", bias="task", queries=3,
                               lr_form="full", bias_lr_scale=True),
    "fomaml-mse": Case(first_order=True, per_step=True, bias="shared", queries=2,
                       lr_form="full", lr_scale=True, bias_lr_scale=True),
    "fomaml-ce": Case(loss="ce", first_order=True, bias="task", queries=2, lr_form="steps"),
    "delta-rule-n1": Case(per_step=True, support=1, d_in=9, d_out=11, queries=1, lr_form="full",
                          steps=5),
    "ce-n1-one-step": Case(loss="ce", support=1, steps=1, tasks=2, bias="shared"),
    "d1": Case(d_in=1, d_out=1, support=3, bias="task", queries=1),
}


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    check_unroll(CASES[name], dtype, seed=len(name))


@interpreter
@pytest.mark.parametrize("name", ["mse-4d-task-all", "mse-3d-readout-bias", "fomaml-mse"])
def test_column_tiles(name, monkeypatch):
    """mse splits d_out over programs; the loss, η̂, X̂ and Q̂ sum over those tiles. Shrink the
    tile so that d_out = 40 spans 3 of them at interpreter-sized shapes."""
    from metakernels.triton import _launch
    monkeypatch.setattr(_launch, "TARGET_WEIGHT_TILE", 256)
    assert _launch.column_block(7, 40, whole_rows=False) == 16
    check_unroll(dataclasses.replace(CASES[name], d_out=40), torch.float32, seed=3)


@interpreter
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_weight_only_gradient(loss):
    """The MAML call: only the meta-init needs a gradient, so no W_t are stored."""
    case = Case(loss=loss, bias="shared", lr_scale=True)
    check_unroll(case, torch.float32, grad_of=("weight", "bias", "lr_scale", "lr"))


@interpreter
@pytest.mark.parametrize("case", [
    Case(per_step=True, steps=7, weight="task", bias="task", lr_form="full", queries=2),
    Case(loss="ce", steps=7, bias="shared", lr_form="steps", lr_scale=True, bias_lr_scale=True),
], ids=["mse-4d-readout", "ce-3d-scales"])
def test_checkpointed_backward(case):
    """checkpoint=True drives the Triton kernels segment by segment (T = 7: segments of 3, 3, 1),
    chaining the adjoints of the segment starts; the answer is the unsegmented one."""
    inputs = make_inputs(case, torch.float64, seed=4)
    low, expected = rounded_reference(inputs, torch.float32, "cpu")
    result = run_unroll(dict(low, checkpoint=True), "triton")
    assert_close(result, expected, TOLERANCE[torch.float32], label=f"{case} checkpointed")


@interpreter
def test_forward_without_grad():
    case = Case(per_step=True, queries=2, bias="task")
    inputs = cast_inputs(make_inputs(case), torch.float32)
    with torch.no_grad():
        got = mk.fast_weight_unroll(**inputs, backend="triton")
        want = mk.fast_weight_unroll(**inputs, backend="reference")
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@interpreter
def test_zero_tasks():
    inputs = cast_inputs(make_inputs(Case(tasks=0, weight="task", bias="task", queries=2,
                                          per_step=True)), torch.float32)
    out = mk.fast_weight_unroll(**inputs, backend="triton")
    assert out.weight.shape == (0, 7, 6) and out.losses.shape == (0, 4)
    assert out.readout.shape == (0, 4, 2, 6)


@interpreter
def test_too_large_for_on_chip_raises():
    x = torch.randn(1, 1, 2048)
    with pytest.raises(RuntimeError, match="triton backend keeps a task on-chip"):
        mk.fast_weight_unroll(torch.zeros(2048, 16), x, torch.zeros(1, 1, 16), 0.1, steps=1,
                              backend="triton")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("form", [("task", "task", False), ("shared", None, True),
                                  (None, None, False), (None, "shared", True)],
                         ids=["bias-vbias", "shared-bias", "no-bias", "v-bias-only"])
def test_linear_hvp(dtype, loss, form):
    from test_linear_hvp import make_hvp_inputs
    bias, v_bias, shared = form
    inputs = make_hvp_inputs(loss, 3, 5, 7, 6, shared=shared, bias=bias, v_bias=v_bias,
                             dtype=dtype, seed=len(loss))
    exact = {k: v.detach().double() if isinstance(v, torch.Tensor) else v
             for k, v in inputs.items()}
    got = mk.linear_hvp(**inputs, backend="triton")
    want = mk.linear_hvp(**exact, backend="reference")
    tol = TOLERANCE[dtype] if dtype == torch.float32 else HALF_TOLERANCE
    assert (got[1] is None) == (want[1] is None)
    for g, w in zip(got, want):
        if w is not None:
            assert g.dtype == dtype
            assert rel_err(g, w) <= tol


@interpreter
def test_linear_hvp_column_tiles(monkeypatch):
    from metakernels.triton import _launch
    from test_linear_hvp import make_hvp_inputs
    monkeypatch.setattr(_launch, "TARGET_WEIGHT_TILE", 256)
    inputs = make_hvp_inputs("mse", 2, 4, 7, 40, dtype=torch.float32)
    exact = {k: v.detach().double() if isinstance(v, torch.Tensor) else v
             for k, v in inputs.items()}
    for g, w in zip(mk.linear_hvp(**inputs, backend="triton"),
                    mk.linear_hvp(**exact, backend="reference")):
        assert rel_err(g, w) <= 1e-4


# --- GPU: realistic shapes ----------------------------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# The standard configurations (docs/conventions.md), scaled where the float64 reference would be
# slow: (case, the inputs that require grad (None: every one), dtypes). Each (case, dtype) compiles
# its own kernels, a few seconds each on a fresh machine, so float16 (the bfloat16 code with another
# load type) runs on the small configurations only.
GPU_CASES = {
    "maml-small": (Case(tasks=64, steps=5, support=16, d_in=64, d_out=64), None,
                   (F32, BF16, F16)),
    "maml-small-weight-only": (Case(tasks=64, steps=5, support=16, d_in=64, d_out=64),
                               ("weight", "lr"), (F32, BF16)),
    "maml-ce": (Case(loss="ce", tasks=64, steps=5, support=25, d_in=64, d_out=5, bias="shared",
                     bias_lr_scale=True), None, (F32, BF16, F16)),
    "trajectory": (Case(tasks=16, steps=64, support=16, d_in=128, d_out=128, per_step=True,
                        queries=16, lr_form="steps"), None, (F32, BF16)),
    "delta-rule": (Case(tasks=8, steps=256, support=1, d_in=128, d_out=128, per_step=True,
                        queries=1, lr_form="full"), None, (F32, BF16)),
    "large": (Case(tasks=256, steps=10, support=64, d_in=128, d_out=128, lr_form="scalar"),
              ("weight", "lr"), (F32, BF16)),
    "large-every-grad": (Case(tasks=64, steps=10, support=64, d_in=128, d_out=128,
                              weight="task", bias="task", lr_scale=True, bias_lr_scale=True,
                              queries=8, lr_form="full"), None, (F32, BF16)),
    "ce-whole-rows": (Case(loss="ce", tasks=8, steps=4, support=32, d_in=128, d_out=32,
                           per_step=True, bias="task", queries=4, lr_scale=True), None,
                      (F32, BF16)),
    "fomaml-odd": (Case(tasks=33, steps=7, support=21, d_in=100, d_out=77, first_order=True,
                        bias="shared", queries=5, lr_scale=True), None, (F32, BF16)),
}
GPU_RUNS = [(name, dtype) for name, (_, _, dtypes) in GPU_CASES.items() for dtype in dtypes]


def on_gpu(test):
    """Marked gpu (skipped without CUDA), and skipped in the interpreter: compiled kernels only."""
    test = pytest.mark.skipif(INTERPRETER, reason="GPU tests run compiled, not interpreted")(test)
    return pytest.mark.gpu(test)



@on_gpu
@pytest.mark.parametrize("name,dtype", GPU_RUNS,
                         ids=[f"{n}-{str(d)[6:]}" for n, d in GPU_RUNS])
def test_gpu_matches_reference(name, dtype):
    """Outputs and every gradient within the tolerance of docs/conventions.md of the float64
    reference (float32: 1e-4 for T <= 16, 1e-3 for the long unrolls, which docs/conventions.md does
    not bound at 1e-4)."""
    case, grad_of, _ = GPU_CASES[name]
    tol = None
    if dtype == torch.float32 and case.steps > 16:
        tol = 1e-3
    result = check_unroll(case, dtype, device="cuda", tol=tol, grad_of=grad_of, seed=7)
    if "cuda" in mk.available_backends("cuda", dtype):
        other = check_unroll(case, dtype, device="cuda", tol=tol, grad_of=grad_of, seed=7,
                             backend="cuda")
        assert_close(result, other, 2 * (tol or (1e-4 if dtype == torch.float32
                                                 else HALF_TOLERANCE)), label="triton vs cuda")


@on_gpu
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_gpu_linear_hvp(loss, dtype):
    from test_linear_hvp import make_hvp_inputs
    inputs = make_hvp_inputs(loss, 128, 25, 128, 64 if loss == "mse" else 10, shared=True,
                             bias="task", v_bias="task", dtype=torch.float64, seed=5)
    low = {k: v.detach().to(dtype).cuda() if isinstance(v, torch.Tensor) else v
           for k, v in inputs.items()}
    exact = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in low.items()}
    got = mk.linear_hvp(**low, backend="triton")
    want = mk.linear_hvp(**exact, backend="reference")
    tol = 1e-4 if dtype == torch.float32 else HALF_TOLERANCE
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.is_cuda
        assert rel_err(g, w) <= tol


@on_gpu
def test_gpu_beyond_the_card_raises_or_is_right():
    """Shapes at the register-tile limit may need more shared memory than the card has (float32
    ce at 128 x 128 needs about 300 KB on sm_90 with Triton 3.9): the call then raises
    RuntimeError saying so, and otherwise it is right. Never a wrong answer."""
    case = Case(loss="ce", tasks=4, steps=3, support=64, d_in=128, d_out=128, per_step=True,
                bias="task", queries=16, lr_scale=True)
    try:
        check_unroll(case, torch.float32, device="cuda", seed=2)
    except RuntimeError as error:
        assert "triton backend keeps a task on-chip" in str(error), str(error)


@on_gpu
def test_gpu_large_offsets_use_int64():
    """B·T·d_in·d_out past 2^31 elements in the stored W_t (8.6 GB): offsets must not wrap.
    Checks the last task's outputs and x gradient against a run of that task alone."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    torch.manual_seed(0)
    B, T = 2**31 // (128 * 128 * 64) + 2, 64
    x = torch.randn(B, T, 1, 128, device="cuda", dtype=torch.bfloat16) * 128 ** -0.5
    y = torch.randn(B, T, 1, 128, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(128, 128, device="cuda") * 128 ** -0.5).to(torch.bfloat16)
    lr = torch.full((B, T), 0.5, device="cuda", dtype=torch.bfloat16)
    x.requires_grad_(True)
    out = mk.fast_weight_unroll(weight, x, y, lr, backend="triton")
    (grad_x,) = torch.autograd.grad(out.weight[-1].float().sum(), [x])
    last = [t[-1:].detach() for t in (x, y, lr)]
    last[0].requires_grad_(True)
    alone = mk.fast_weight_unroll(weight, last[0], last[1], last[2], backend="triton")
    (grad_alone,) = torch.autograd.grad(alone.weight[0].float().sum(), [last[0]])
    # Same kernel code per task, but the sums over column tiles may associate differently at
    # another size: compare within bf16 rounding; a wrapped offset reads another task entirely.
    assert rel_err(out.weight[-1], alone.weight[0]) <= 1e-2
    assert rel_err(out.losses[-1], alone.losses[0]) <= 1e-2
    assert rel_err(grad_x[-1], grad_alone[0]) <= 1e-2
    assert torch.isfinite(grad_x).all()
