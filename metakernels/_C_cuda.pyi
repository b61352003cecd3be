"""Typed stub of the compiled CUDA module (csrc/torch/binding_cuda.cpp, csrc/cuda/): the eager
CUDA bodies of the metakernels:: custom ops, backend="cuda". The functions, arguments and returns
are those of metakernels/_C.pyi; inputs are CUDA tensors of float32, bfloat16 or float16, the
saved residual and states are float32. Call the ops through metakernels.fast_weight_unroll /
linear_hvp."""

# The same four kernel entry points as the CPU module (metakernels/_C.pyi).
from metakernels._C import linear_hvp as linear_hvp
from metakernels._C import set_poison_outputs as set_poison_outputs
from metakernels._C import unroll_backward as unroll_backward
from metakernels._C import unroll_forward as unroll_forward

def set_mma_enabled(enabled: bool) -> None: ...
def mma_enabled() -> bool: ...
def mma_launches() -> int: ...
def set_mma_splits(splits: int) -> None: ...
