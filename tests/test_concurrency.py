"""Calls from several Python threads at once give the same results as the same calls made one
after another (issue 8): forward and backward (torch.autograd.grad in each thread), both losses,
the Gram-space and step-loop paths, first order, checkpointed, and linear_hvp, on every backend
available here, with one and with two intra-op threads (the CPU kernels split tasks with
at::parallel_for). The compiled backends are deterministic, so the results must be bitwise
equal; so must the reference's (plain PyTorch on CPU).

The CPU kernels run without the GIL (csrc/torch/binding.cpp), so the threads really are inside
them at once; with the GIL held they ran one at a time and no race there could show. Making the
thread_local scratch of small_gemm.h static fails every cpu workload here.

What could race, and what each test here would catch: the outputs are allocated per call; the
CPU kernels keep their scratch in thread_local vectors (small_gemm.h) and per-call locals; the
Gram backward of a shared init sums into one [d_in, d_out] slot per intra-op thread of its own
call; the only process-wide state is the poison flag (set by tests, read by every call) and the
Python side's warn-once set and lazy backend loader. The Triton interpreter is not thread-safe
(one global builder holds the program id and every launch patches triton.language), so the
Triton backend serialises its launches in the interpreter (metakernels/triton/_launch.py); the
Triton test here runs with TRITON_INTERPRET=1 (``make test-triton``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import metakernels as mk
from conftest import COMPILED_BACKENDS, Case, make_inputs, rel_err, run_hvp, run_unroll
from metakernels.ops import unroll_path
from test_fast_weight_meta_loss import make_meta_inputs, run_meta

THREADS = 4
CALLS_PER_THREAD = 6

SMALL = dict(tasks=5, steps=4, support=3, d_in=16, d_out=8)
# (case, checkpoint, whether x requires grad, the cpu path it takes)
UNROLLS = {
    "gram": (Case(weight="shared", **SMALL), None, False, "gram"),
    "steps/gram": (Case(bias="shared", **SMALL), None, True, "steps/gram"),
    "steps-mse": (Case(per_step=True, queries=2, bias="task", weight="task", lr_form="full",
                       lr_scale=True, bias_lr_scale=True), None, True, "steps"),
    "steps-ce": (Case(loss="ce", per_step=True, queries=2, bias="shared", lr_form="steps",
                      lr_scale=True), None, True, "steps"),
    "ce-3d-first-order": (Case(loss="ce", bias="task", first_order=True, queries=1), None, True,
                          "steps"),
    "checkpoint-ce": (Case(loss="ce", per_step=True, steps=9, queries=2, bias="task"), True, True,
                      "steps + checkpoint(3)"),
    "checkpoint-gram": (Case(**dict(SMALL, steps=9)), True, True, "gram + checkpoint(3)"),
}


def unroll_inputs(name: str, seed: int) -> dict:
    case, _, x_grad, _ = UNROLLS[name]
    inputs = make_inputs(case, torch.float32, seed=seed)
    inputs["x"].requires_grad_(x_grad)
    return inputs


def unroll_once(name: str, backend: str, seed: int) -> dict:
    """Outputs and every gradient of one call on fresh inputs drawn from ``seed``."""
    checkpoint = UNROLLS[name][1]
    inputs = unroll_inputs(name, seed)
    if checkpoint is not None:
        inputs["checkpoint"] = checkpoint
    return run_unroll(inputs, backend, seed=seed)


def hvp_once(loss: str, backend: str, seed: int) -> dict:
    """linear_hvp and the gradients of <Hv, random> in weight, x, v, bias and v_bias."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"weight": (7, 5), "x": (4, 6, 7), "v": (4, 7, 5), "bias": (4, 5), "v_bias": (5,)}
    inputs = {k: torch.randn(s, generator=gen).requires_grad_() for k, s in shapes.items()}
    return run_hvp(dict(inputs, loss=loss), backend, seed=seed)


def meta_loss_once(form: str, backend: str, seed: int) -> dict:
    """fast_weight_meta_loss (ce, 4-D x, bias) and every gradient, on fresh inputs."""
    case = Case(loss="ce", per_step=True, bias="shared", lr_form="full", **SMALL)
    return run_meta(make_meta_inputs(case, form, m=2, dtype=torch.float32, seed=seed), backend)


def mlp_once(form: str, backend: str, seed: int) -> dict:
    """fast_weight_mlp_meta_loss (gelu, 4-D x, mixed layers) and every gradient, float32."""
    from test_fast_weight_mlp import MlpCase, add_queries, make_mlp_inputs, run, to_dtype
    case = MlpCase(activation="gelu", per_step=True, layers="mixed", queries=2,
                   lr_form="full")
    kwargs = to_dtype(add_queries(make_mlp_inputs(case, seed=seed), case, form, seed=seed + 1),
                      torch.float32)
    return run(kwargs, backend, True)


WORKLOADS = {**{f"mlp-meta-loss-{form}": (lambda backend, seed, form=form:
                                          mlp_once(form, backend, seed))
                for form in ("A", "B")},
             **{f"meta-loss-{form}": (lambda backend, seed, form=form:
                                      meta_loss_once(form, backend, seed))
                for form in ("A", "B")},
             **{name: (lambda backend, seed, name=name: unroll_once(name, backend, seed))
                for name in UNROLLS},
             **{f"linear_hvp-{loss}": (lambda backend, seed, loss=loss:
                                       hvp_once(loss, backend, seed))
                for loss in ("mse", "ce")}}


def assert_same(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys(), label
    for key, value in want.items():
        if value is None:
            assert got[key] is None, f"{label} {key}"
        else:
            assert torch.equal(got[key], value), (
                f"{label} {key}: differs from the sequential call by "
                f"{(got[key] - value).abs().max().item():.3e}")


def check_threads_match_sequential(workload: str, backend: str, threads: int = THREADS,
                                   calls: int = CALLS_PER_THREAD) -> None:
    """``threads`` threads, each making ``calls`` calls on inputs of its own, all at once, against
    the same calls one after another."""
    run = WORKLOADS[workload]
    seeds = [[100 * thread + call for call in range(calls)] for thread in range(threads)]
    sequential = {seed: run(backend, seed) for row in seeds for seed in row}

    def thread_body(row):
        return {seed: run(backend, seed) for seed in row}

    with ThreadPoolExecutor(max_workers=threads) as pool:
        concurrent = [pool.submit(thread_body, row) for row in seeds]
        results = [future.result() for future in concurrent]
    for row, result in zip(seeds, results):
        for seed in row:
            assert_same(result[seed], sequential[seed], f"{backend} {workload} seed {seed}")


@pytest.fixture(params=[1, 2], ids=["intra1", "intra2"])
def intra_op_threads(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", [b for b in COMPILED_BACKENDS if b != "triton"]
                         + ["reference"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_threads_match_sequential(workload, backend, intra_op_threads):
    if workload in UNROLLS and backend == "cpu":
        inputs = unroll_inputs(workload, 0)
        assert unroll_path(**inputs, backend="cpu", checkpoint=UNROLLS[workload][1]) \
            == UNROLLS[workload][3]
    check_threads_match_sequential(workload, backend)


@pytest.mark.skipif("triton" not in COMPILED_BACKENDS,
                    reason="Triton on CPU tensors: run with TRITON_INTERPRET=1 (make test-triton)")
@pytest.mark.parametrize("workload", ["gram", "steps-ce", "checkpoint-ce", "linear_hvp-ce",
                                      "meta-loss-B"])
def test_triton_interpreter_threads_match_sequential(workload):
    """The Triton backend in its interpreter (a second or more per call: 3 threads x 2 calls).
    The interpreter itself is not thread-safe; the backend serialises its launches there, without
    which these calls raised or returned wrong values."""
    check_threads_match_sequential(workload, "triton", threads=3, calls=2)


@pytest.mark.parametrize("backend", [b for b in COMPILED_BACKENDS if b != "triton"])
def test_deterministic_across_intra_op_threads(backend, intra_op_threads):
    """The same call is bitwise the same with one intra-op thread and with two, except the Gram
    backward of a shared init, which sums per thread: there only within rounding."""
    for workload in ("steps-ce", "steps-mse", "checkpoint-ce", "linear_hvp-ce", "gram",
                     "steps/gram", "meta-loss-A", "meta-loss-B"):
        here = WORKLOADS[workload](backend, 5)
        torch.set_num_threads(3 - intra_op_threads)
        other = WORKLOADS[workload](backend, 5)
        torch.set_num_threads(intra_op_threads)
        if "gram" in workload and backend == "cpu":
            # The shared init's gradient: one partial sum per intra-op thread, then their sum.
            assert rel_err(here.pop("grad_weight"), other.pop("grad_weight")) < 1e-6
        assert_same(here, other, f"{backend} {workload}")
