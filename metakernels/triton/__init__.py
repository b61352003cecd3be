"""metakernels' Triton backend: the eager kernels behind the ``metakernels::`` custom ops with
``backend="triton"``, with the signatures of ``metakernels/_C.pyi``.

Runs on CUDA tensors (float32, bfloat16, float16; float32 state and accumulation; float32 tl.dot
products for float32 inputs, tf32 for half inputs), and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, float32 and float16) for tests. What is stored for the backward, the grid
and the shape limits: :mod:`metakernels.triton.fast_weight_unroll`.
"""

from metakernels.triton._launch import set_poison_outputs
# The chunked kernels of 4-D mse where they apply, else the step kernels (fast_weight_chunked).
from metakernels.triton.fast_weight_chunked import (chunked_expected, set_chunked_knobs,
                                                    unroll_backward, unroll_forward, unroll_path)
from metakernels.triton.linear_hvp import linear_hvp
# The MLP fast-weight ops (fast_weight_mlp_unroll / _meta_loss) and the probe of their limits.
from metakernels.triton.fast_weight_mlp import mlp_backward, mlp_forward, mlp_unsupported_reason

__all__ = ["unroll_forward", "unroll_backward", "unroll_path", "linear_hvp",
           "set_poison_outputs", "chunked_expected", "set_chunked_knobs",
           "mlp_forward", "mlp_backward", "mlp_unsupported_reason"]
