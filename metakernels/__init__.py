"""metakernels: fused batched inner loops for meta-learning, with exact second-order
meta-gradients. The op contract is docs/ (docs/README.md; in a wheel, metakernels/docs/)."""

from metakernels.ops import (HvpOutput, UnrollOutput, available_backends, delta_rule,
                             fast_weight_meta_loss, fast_weight_mlp_meta_loss,
                             fast_weight_mlp_unroll, fast_weight_unroll, linear_hvp)
from metakernels.reference import MLPUnrollOutput

__version__ = "0.1.0"

__all__ = ["HvpOutput", "MLPUnrollOutput", "UnrollOutput", "__version__", "available_backends",
           "delta_rule", "fast_weight_meta_loss", "fast_weight_mlp_meta_loss",
           "fast_weight_mlp_unroll", "fast_weight_unroll", "linear_hvp"]
