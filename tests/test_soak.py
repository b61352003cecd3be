"""Soak: every CPU op, forward and backward, called thousands of times, keeps its resident memory
flat (issue 8). A leak of even the smallest output of every call fails the test;
test_soak_catches_a_leak proves it by leaking that output on purpose.

Two readings after each batch, both after gc.collect():
- resident memory: the current RSS (/proc/self/statm), after glibc's malloc_trim(0) so that freed
  memory malloc holds back does not count; its growth must stay under BOUND.
- the bytes malloc has handed out and not got back (glibc's mallinfo2: uordblks + hblkhd), where
  tensors, their storage and the kernels' scratch live; its growth must stay under HEAP_BOUND.
  RSS alone cannot see a small leak reliably: leaked blocks can fill holes in pages that are
  already resident (a CI run kept every call's losses and RSS did not grow), while malloc's count
  moves by exactly the bytes kept (here a non-leaking op moves it by 0-3 KiB over 1,200 calls).
Each op first runs WARMUP calls (allocator caches, thread-local scratch, first-call costs), then
BATCHES batches of CALLS calls with a reading after each; the growth is from the first reading to
the last (over (BATCHES − 1) × CALLS calls). A leak of the smallest output, the detached
``losses`` [3, 4] (48 bytes of data, about 400 bytes with its tensor and storage), over those
calls is ~480 KiB of malloc's count, over seven times HEAP_BOUND.

The default run uses one intra-op thread: on a busy 2-core machine OpenMP's barriers make a call
with two threads 10-30 times slower, and the kernels allocate the same way either way. The slow
variant keeps torch's thread count and runs ten times as many calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch

import metakernels as mk
from conftest import Case, differentiable, make_inputs
from metakernels.ops import unroll_path
from test_fast_weight_meta_loss import make_meta_inputs

pytestmark = [
    pytest.mark.skipif("cpu" not in mk.available_backends("cpu"), reason="no cpu backend built"),
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc"),
]

WARMUP, CALLS, BATCHES = 200, 400, 4
BOUND = 256 * 1024  # bytes of RSS growth allowed over (BATCHES - 1) * CALLS calls
HEAP_BOUND = 64 * 1024  # bytes of growth of malloc's count allowed over the same calls

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def heap_bytes() -> int | None:
    """Bytes malloc has handed out and not got back (None without glibc's mallinfo2)."""
    if _MALLINFO2 is None:
        return None
    gc.collect()
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def resident_bytes() -> int:
    """Current resident memory of this process, after collecting garbage and returning malloc's
    free memory to the system."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def soak(call, warmup: int = WARMUP, calls: int = CALLS, batches: int = BATCHES) -> list[tuple]:
    """(RSS, malloc's count) after each of ``batches`` batches of ``calls`` calls, after
    ``warmup`` calls."""
    for _ in range(warmup):
        call()
    readings = []
    for _ in range(batches):
        for _ in range(calls):
            call()
        readings.append((resident_bytes(), heap_bytes()))
    return readings


def assert_flat(readings: list[tuple], label: str, calls: int = CALLS) -> None:
    rss, heap = zip(*readings)
    span = f"over {(len(readings) - 1) * calls} calls"
    growth = rss[-1] - rss[0]
    assert growth < BOUND, (f"{label}: resident memory grew {growth / 1024:.0f} KiB {span} "
                            f"(readings, KiB: {[r // 1024 for r in rss]})")
    if heap[0] is not None:
        growth = heap[-1] - heap[0]
        assert growth < HEAP_BOUND, (f"{label}: memory held from malloc grew "
                                     f"{growth / 1024:.0f} KiB {span} (readings, KiB: "
                                     f"{[h // 1024 for h in heap]})")


def unroll_call(case: Case, *, checkpoint=None, x_grad: bool = True, path: str):
    """One forward and backward of fast_weight_unroll on the cpu backend; returns its losses."""
    inputs = make_inputs(case, torch.float32, seed=7)
    if not x_grad:
        inputs["x"].requires_grad_(False)
    assert unroll_path(**inputs, backend="cpu", checkpoint=checkpoint) == path
    leaves = list(differentiable(inputs).values())

    def call():
        out = mk.fast_weight_unroll(**inputs, backend="cpu", checkpoint=checkpoint)
        outputs = [t for t in (out.weight, out.bias, out.readout) if t is not None]
        torch.autograd.grad(outputs, leaves, [torch.ones_like(t) for t in outputs],
                            allow_unused=True)
        return out.losses

    return call


def hvp_call(loss: str):
    """One forward and backward of linear_hvp on the cpu backend; returns Hv_bias [3, 4]."""
    gen = torch.Generator().manual_seed(3)
    weight, x, v = (torch.randn(shape, generator=gen).requires_grad_()
                    for shape in ((3, 5, 4), (3, 6, 5), (3, 5, 4)))
    bias = torch.randn(4, generator=gen)

    def call():
        hv_weight, hv_bias = mk.linear_hvp(weight, x, v, loss=loss, bias=bias, backend="cpu")
        torch.autograd.grad((hv_weight, hv_bias), (weight, x, v),
                            (torch.ones_like(hv_weight), torch.ones_like(hv_bias)))
        return hv_bias

    return call


def meta_loss_call(case: Case, form: str, *, x_grad: bool = True, path: str):
    """One forward and backward of fast_weight_meta_loss on the cpu backend; returns the loss."""
    inputs = make_meta_inputs(case, form, m=2, dtype=torch.float32, seed=7)
    if not x_grad:
        inputs["x"].requires_grad_(False)
        inputs["query_x"].requires_grad_(False)
    assert mk.ops.meta_loss_path(**inputs, backend="cpu") == path
    leaves = list(differentiable(inputs).values())

    def call():
        meta_loss = mk.fast_weight_meta_loss(**inputs, backend="cpu")
        torch.autograd.grad(meta_loss, leaves, allow_unused=True)
        return meta_loss.detach()

    return call


def mlp_call(checkpoint: bool):
    """One forward and backward of fast_weight_mlp_meta_loss on the cpu backend (tanh, two
    layers, form B); returns the loss."""
    from test_fast_weight_mlp import MlpCase, add_queries, make_mlp_inputs, to_dtype
    case = MlpCase(per_step=True, steps=5, queries=2, layers="mixed")
    inputs = to_dtype(add_queries(make_mlp_inputs(case, seed=7), case, "B"), torch.float32)
    leaves = [t for v in inputs.values() for t in (v if isinstance(v, list) else [v])
              if isinstance(t, torch.Tensor) and t.requires_grad]

    def call():
        meta_loss = mk.fast_weight_mlp_meta_loss(**inputs, checkpoint=checkpoint, backend="cpu")
        torch.autograd.grad(meta_loss, leaves)
        return meta_loss.detach()

    return call


SMALL = dict(tasks=3, steps=4, support=3, d_in=16, d_out=8)
WORKLOADS = {
    # fast_weight_mlp_meta_loss: θ_t kept every step, and checkpointed.
    "mlp-meta-loss": lambda: mlp_call(False),
    "mlp-meta-loss-checkpoint": lambda: mlp_call(True),
    # fast_weight_meta_loss: the fused query loss beside the Gram path and the step loop.
    "meta-loss-gram": lambda: meta_loss_call(Case(**SMALL), "A", x_grad=False,
                                             path="fused:gram-space"),
    "meta-loss-ce-readout": lambda: meta_loss_call(
        Case(loss="ce", per_step=True, bias="task", lr_scale=True), "B", path="fused:steps"),
    # mse, 3-D x, no x gradient: the Gram-space forward and backward.
    "gram": lambda: unroll_call(Case(**SMALL), x_grad=False, path="gram"),
    # ... with x's gradient: the step-loop forward storing W_t, then the Gram-space backward.
    "steps/gram": lambda: unroll_call(Case(bias="shared", **SMALL), path="steps/gram"),
    # ce, 4-D x, readout, lr_scale, per-step lr: the step loop, second order.
    "steps-ce": lambda: unroll_call(
        Case(loss="ce", per_step=True, queries=2, bias="task", lr_scale=True, lr_form="full"),
        path="steps"),
    "steps-mse-first-order": lambda: unroll_call(
        Case(per_step=True, queries=2, bias="shared", first_order=True), path="steps"),
    # The checkpointed custom ops: segments of 3 steps, the backward nested.
    "checkpoint-ce": lambda: unroll_call(
        Case(loss="ce", per_step=True, steps=9, queries=2, bias="task"), checkpoint=True,
        path="steps + checkpoint(3)"),
    "checkpoint-gram": lambda: unroll_call(Case(**dict(SMALL, steps=9)), checkpoint=True,
                                           path="gram + checkpoint(3)"),
    "linear_hvp-mse": lambda: hvp_call("mse"),
    "linear_hvp-ce": lambda: hvp_call("ce"),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_resident_memory_stays_flat(workload, one_thread):
    assert_flat(soak(WORKLOADS[workload]()), workload)


def test_soak_catches_a_leak(one_thread):
    """The detector itself: keeping the smallest output of every call (the losses, [3, 4]
    float32) is a leak that assert_flat reports."""
    if _MALLINFO2 is None:
        pytest.skip("needs glibc's mallinfo2 (RSS alone cannot see so small a leak reliably)")
    call, kept = WORKLOADS["gram"](), []
    readings = soak(lambda: kept.append(call()))
    with pytest.raises(AssertionError, match="grew"):
        assert_flat(readings, "gram, leaking its losses")


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_resident_memory_stays_flat_long(workload):
    """Ten times as many calls: the same bounds catch a leak of ~50 bytes of RSS, or a few bytes
    from malloc, per call."""
    assert_flat(soak(WORKLOADS[workload](), calls=10 * CALLS), workload, calls=10 * CALLS)
