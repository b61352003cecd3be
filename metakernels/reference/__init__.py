"""The pure-PyTorch version of every op: the truth every backend and test is compared with."""

from metakernels.reference.delta_rule import delta_rule
from metakernels.reference.fast_weight import fast_weight_unroll, linear_hvp
from metakernels.reference.fast_weight_mlp import (MLPUnrollOutput, fast_weight_mlp_meta_loss,
                                                   fast_weight_mlp_unroll)
from metakernels.reference.meta_loss import fast_weight_meta_loss

__all__ = ["MLPUnrollOutput", "delta_rule", "fast_weight_meta_loss", "fast_weight_mlp_meta_loss",
           "fast_weight_mlp_unroll", "fast_weight_unroll", "linear_hvp"]
