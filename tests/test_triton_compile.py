"""The Triton kernels compile for the GPUs they target, checked without a GPU.

Triton's interpreter (tests/test_triton.py) runs the kernels' arithmetic on the CPU but never
compiles them, so a kernel that a GPU compile rejects (tl.dot shape or dtype rules, more shared
memory than the card has) would pass there. Here every launch of a few representative calls is
compiled for sm_90 (H100/H200) and sm_80 (A100) with Triton's own compiler and ptxas, on
``meta`` tensors, and nothing runs. The full list of the GPU tests' shapes, with each kernel's
shared memory, is ``python bench/gpu/triton_compile_check.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("compiles for a GPU target; the interpreter run is tests/test_triton.py",
                allow_module_level=True)

from conftest import Case, make_inputs  # noqa: E402

from metakernels.triton import _launch  # noqa: E402
from metakernels.triton.compile_check import compile_unroll, compile_linear_hvp  # noqa: E402

STEP_KERNELS = ["fast_weight_unroll_bwd_kernel", "fast_weight_unroll_fwd_kernel"]
CHUNKED_KERNELS = ["fast_weight_chunked_bwd_kernel", "fast_weight_chunked_fwd_kernel"]
# (case, dtype, store_states, the kernels its forward and backward launch). 4-D mse without
# lr_scale takes the chunked kernels: its forward when no W_t is stored, its backward always.
CASES = {
    "maml-small-f32": (Case(tasks=64, steps=5, support=16, d_in=64, d_out=64), torch.float32,
                       True, STEP_KERNELS),
    "maml-ce-bf16": (Case(loss="ce", tasks=64, steps=5, support=25, d_in=64, d_out=5,
                          bias="shared", bias_lr_scale=True), torch.bfloat16, True, STEP_KERNELS),
    "trajectory-f16": (Case(per_step=True, tasks=16, steps=4, support=16, d_in=128, d_out=128,
                            queries=16, lr_form="steps"), torch.float16, True,
                       ["fast_weight_chunked_bwd_kernel", "fast_weight_unroll_fwd_kernel"]),
    "delta-rule-odd-f32": (Case(per_step=True, tasks=4, steps=3, support=1, d_in=37, d_out=45,
                                queries=1, weight="task", bias="task", lr_scale=True),
                           torch.float32, True, STEP_KERNELS),
    "delta-rule-chunked-bf16": (Case(per_step=True, tasks=4, steps=70, support=1, d_in=128,
                                     d_out=128, queries=1, weight="task", lr_form="full"),
                                torch.bfloat16, False, CHUNKED_KERNELS),
    "delta-rule-chunked-f32": (Case(per_step=True, tasks=4, steps=70, support=1, d_in=128,
                                    d_out=128, queries=1, bias="shared", lr_form="full"),
                               torch.float32, False, CHUNKED_KERNELS),
    "ttt-chunked-f16": (Case(per_step=True, tasks=4, steps=9, support=16, d_in=64, d_out=64,
                             queries=16, bias="task", lr_form="full"), torch.float16, False,
                        CHUNKED_KERNELS),
}


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("name", list(CASES))
def test_unroll_kernels_compile(name, capability):
    case, dtype, store_states, expected = CASES[name]
    with _launch.compile_only(capability) as records:
        compile_unroll(make_inputs(case), dtype, loss=case.loss, first_order=case.first_order,
                       store_states=store_states)
    kernels = sorted({r["kernel"] for r in records})
    assert kernels == expected
    assert all(0 <= r["shared_bytes"] <= _launch.SHARED_MEMORY_LIMIT[capability]
               for r in records)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_linear_hvp_kernel_compiles(loss):
    with _launch.compile_only(90) as records:
        compile_linear_hvp(loss, tasks=8, support=25, d_in=64, d_out=10, dtype=torch.bfloat16)
    assert [r["kernel"] for r in records] == ["linear_hvp_fwd_kernel"]


def test_too_much_shared_memory_is_refused_like_a_launch():
    """float32 ce owning whole 128-column rows with n = 64 needs more shared memory than an
    H100 has: the compile-only launch raises the RuntimeError a real launch gives."""
    case = Case(loss="ce", per_step=True, tasks=2, steps=2, support=64, d_in=128, d_out=64,
                bias="task", queries=64, lr_scale=True, bias_lr_scale=True, lr_form="full")
    with pytest.raises(RuntimeError, match="needs more than the card has"):
        with _launch.compile_only(90):
            compile_unroll(make_inputs(case), torch.float32, loss="ce")


def test_mlp_kernels_compile():
    """The MLP kernels (metakernels/triton/fast_weight_mlp.py) at maml-sinusoid's sizes, meta-loss
    form A, float32, for sm_90: one forward (and the backward's recompute of θ_T), one backward."""
    from metakernels.triton.compile_check import compile_mlp
    with _launch.compile_only(90) as records:
        compile_mlp((1, 40, 40, 1), torch.float32, tasks=25, steps=5, support=10, rows=10,
                    meta="A")
    assert sorted({r["kernel"] for r in records}) == ["fast_weight_mlp_bwd_kernel",
                                                      "fast_weight_mlp_fwd_kernel"]
    assert all(0 <= r["shared_bytes"] <= _launch.SHARED_MEMORY_LIMIT[90] for r in records)
