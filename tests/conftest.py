"""Shared test helpers: random problems of every input form, the comparison every test uses, and
NaN-poisoned outputs for the compiled backends."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

import metakernels as mk

COMPILED_BACKENDS = [b for b in mk.available_backends("cpu") if b != "reference"]

# Hypothesis profiles (tests/test_properties.py). The default one, in `make test`: the same
# examples every run (derandomize), no deadline (the first call of a kernel pays for its
# compilation or import), no example database, no search towards hypothesis.target's scores
# (its examples would crowd around one). "metakernels-fuzz", for the tests marked fuzz
# (`pytest -m fuzz`): fresh random examples, METAKERNELS_FUZZ_EXAMPLES of them per test, failures
# kept under build/hypothesis and replayed first on the next run. Each test sets its own
# max_examples on top of the default profile.
# The autouse poisoning fixture is function-scoped: it sets a flag that holds for every example.
_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("metakernels", derandomize=True, deadline=None, database=None,
                          suppress_health_check=_SLOW_DATA,
                          phases=[p for p in Phase if p != Phase.target])
settings.register_profile(
    "metakernels-fuzz", derandomize=False, deadline=None, print_blob=True,
    max_examples=int(os.environ.get("METAKERNELS_FUZZ_EXAMPLES", "400")),
    database=DirectoryBasedExampleDatabase(
        str(pathlib.Path(__file__).resolve().parents[1] / "build" / "hypothesis")),
    suppress_health_check=_SLOW_DATA)
settings.load_profile("metakernels")
# docs/conventions.md, accuracy: norm-wise relative error against the float64 reference (bfloat16
# and float16: the GPU backends, and Triton's interpreter).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def poison_compiled_outputs():
    """Every output of the compiled kernels starts as NaN, so an unwritten element fails a test."""
    modules = _compiled_modules()
    for module in modules:
        module.set_poison_outputs(True)
    yield
    for module in modules:
        module.set_poison_outputs(False)


def _compiled_modules():
    """The kernel modules of every compiled backend on this install (each has
    ``set_poison_outputs``, like ``metakernels/_C.pyi``)."""
    from metakernels.ops import _backends
    modules = []
    for name in ("cpu", "triton", "cuda"):
        module = _backends._module(name)[0]
        if module is not None and module not in modules:
            modules.append(module)
    return modules


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the plain norm where ref is zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = (out - ref).norm().item()
    scale = ref.norm().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


# Mixes of the optional inputs of Case: each row turns on a different few, so that crossed with
# the losses, x forms, orders and dtypes of a test every feature meets every other axis.
FEATURES = [
    dict(weight="shared", bias=None, lr_form="float"),
    dict(weight="task", bias="shared", lr_form="full", lr_scale=True, bias_lr_scale=True, queries=3),
    dict(weight="shared", bias="task", lr_form="steps", bias_lr_scale=True, queries=2),
    dict(weight="task", bias=None, lr_form="tasks", lr_scale=True, queries=1),
    dict(weight="shared", bias="shared", lr_form="scalar", lr_scale=True),
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One input form of fast_weight_unroll (docs/ops/fast_weight_unroll.md)."""

    loss: str = "mse"
    per_step: bool = False          # 4-D x [B, T, n, d_in] instead of 3-D x with steps=T
    tasks: int = 3
    steps: int = 4
    support: int = 5
    d_in: int = 7
    d_out: int = 6
    queries: int = 0                # m, readout rows per step (0: no readout)
    weight: str = "shared"          # "shared" [d_in, d_out] or "task" [B, d_in, d_out]
    bias: str | None = None         # None, "shared" [d_out] or "task" [B, d_out]
    # float | scalar [] | steps [T] | tasks [B, 1] | full [B, T], and the other shapes that
    # broadcast to [B, T]: one [1] | one-one [1, 1] | row [1, T]
    lr_form: str = "float"
    lr_scale: bool = False
    bias_lr_scale: bool = False
    first_order: bool = False


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0) -> dict:
    """Fresh random keyword arguments for fast_weight_unroll; every differentiable floating
    tensor requires grad. x is scaled so that the inner loop is stable at lr ≤ 0.6."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    def rand(*shape, low, high):
        return (low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)

    B, T, n, d_in, d_out = case.tasks, case.steps, case.support, case.d_in, case.d_out
    lead = (B, T, n) if case.per_step else (B, n)
    kwargs = {
        "weight": randn(*((d_in, d_out) if case.weight == "shared" else (B, d_in, d_out)),
                        scale=d_in ** -0.5),
        "x": randn(*lead, d_in, scale=d_in ** -0.5),
        "loss": case.loss,
        "first_order": case.first_order,
    }
    if case.loss == "mse":
        kwargs["y"] = randn(*lead, d_out)
    else:
        kwargs["y"] = torch.randint(0, d_out, lead, generator=gen)
    lr_shapes = {"scalar": (), "steps": (T,), "tasks": (B, 1), "full": (B, T), "one": (1,),
                 "one-one": (1, 1), "row": (1, T)}
    if case.lr_form == "float":
        kwargs["lr"] = 0.4
    else:
        kwargs["lr"] = rand(*lr_shapes[case.lr_form], low=0.2, high=0.6)
    if not case.per_step:
        kwargs["steps"] = T
    if case.bias is not None:
        kwargs["bias"] = randn(*((d_out,) if case.bias == "shared" else (B, d_out)))
    if case.lr_scale:
        kwargs["lr_scale"] = rand(d_in, d_out, low=0.5, high=1.5)
    if case.bias_lr_scale:
        kwargs["bias_lr_scale"] = rand(d_out, low=0.5, high=1.5)
    if case.queries:
        kwargs["queries"] = randn(B, T, case.queries, d_in)
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value.requires_grad_(True)
    return kwargs


def cast_inputs(kwargs: dict, dtype) -> dict:
    """The same inputs in another floating dtype, as fresh leaves."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype).requires_grad_(value.requires_grad)
        out[key] = value
    return out


def differentiable(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def cotangents(out: mk.UnrollOutput, seed: int = 1) -> list:
    """Random adjoints for the differentiable outputs (W_T, b_T, readout)."""
    gen = torch.Generator().manual_seed(seed)
    return [None if t is None else torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            for t in (out.weight, out.bias, out.readout)]


def run_unroll(kwargs: dict, backend: str, seed: int = 1) -> dict:
    """Outputs and the gradients of every differentiable input under random adjoints (through
    the outputs that depend on some input that requires grad; None where none does)."""
    out = mk.fast_weight_unroll(**kwargs, backend=backend)
    pairs = [(t, g) for t, g in zip((out.weight, out.bias, out.readout), cotangents(out, seed))
             if t is not None and t.requires_grad]
    leaves = differentiable(kwargs)
    grads = [None] * len(leaves)
    if pairs and leaves:
        grads = torch.autograd.grad([t for t, _ in pairs], list(leaves.values()),
                                    [g for _, g in pairs], allow_unused=True)
    result = {"weight": out.weight, "bias": out.bias, "losses": out.losses,
              "readout": out.readout}
    result.update({f"grad_{k}": g for k, g in zip(leaves, grads)})
    return result


def run_hvp(kwargs: dict, backend: str, seed: int = 1) -> dict:
    """linear_hvp on ``kwargs`` (its keyword arguments, loss included): Hv and the gradients of
    <Hv, random adjoints> in every differentiable input."""
    hv_weight, hv_bias = mk.linear_hvp(**kwargs, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    outputs = [t for t in (hv_weight, hv_bias) if t is not None]
    adjoints = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
                for t in outputs]
    leaves = differentiable(kwargs)
    grads = torch.autograd.grad(outputs, list(leaves.values()), adjoints, allow_unused=True)
    return dict(hv_weight=hv_weight, hv_bias=hv_bias,
                **{f"grad_{k}": g for k, g in zip(leaves, grads)})


def assert_close(result: dict, expected: dict, tol: float, label: str = "") -> None:
    assert result.keys() == expected.keys()
    for key in expected:
        got, want = result[key], expected[key]
        if want is None or got is None:
            assert got is None and want is None, f"{label} {key}: {got is None=} {want is None=}"
            continue
        err = rel_err(got, want)
        assert err <= tol, f"{label} {key}: relative error {err:.3e} > {tol:.0e}"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    """Which metakernels the run tests, and its compiled backends: `python -m pytest` in a
    checkout imports the source tree (without a compiled extension unless it was built in place,
    `pip install --no-build-isolation -e .`), where the `pytest` command imports the installed
    package; the compiled backends' tests skip where the extension is missing."""
    where = pathlib.Path(mk.__file__).parent
    built = ", ".join(COMPILED_BACKENDS) or "none (not built)"
    return f"metakernels {mk.__version__} from {where}; compiled backends tested here: {built}"
