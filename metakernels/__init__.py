"""metakernels: fused batched inner loops for meta-learning, with exact second-order
meta-gradients. The op contract is SPEC.md; the maths is in the README."""

from metakernels.ops import (UnrollOutput, available_backends, fast_weight_meta_loss,
                             fast_weight_unroll, linear_hvp)
from metakernels.ops import fast_weight_mlp_meta_loss, fast_weight_mlp_unroll
from metakernels.reference import MLPUnrollOutput

__version__ = "0.1.0"

__all__ = ["MLPUnrollOutput", "UnrollOutput", "__version__", "available_backends",
           "fast_weight_meta_loss", "fast_weight_mlp_meta_loss", "fast_weight_mlp_unroll",
           "fast_weight_unroll", "linear_hvp"]
