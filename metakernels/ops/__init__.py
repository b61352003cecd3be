"""One module per op: argument checks, backend dispatch, autograd (the torch.library custom ops)."""

from metakernels.ops._backends import available_backends
from metakernels.ops.fast_weight_meta_loss import fast_weight_meta_loss, meta_loss_path
from metakernels.ops.fast_weight_mlp import fast_weight_mlp_meta_loss, fast_weight_mlp_unroll
from metakernels.ops.fast_weight_unroll import UnrollOutput, fast_weight_unroll, unroll_path
from metakernels.ops.linear_hvp import linear_hvp

__all__ = ["UnrollOutput", "available_backends", "fast_weight_meta_loss",
           "fast_weight_mlp_meta_loss", "fast_weight_mlp_unroll", "fast_weight_unroll",
           "linear_hvp", "meta_loss_path", "unroll_path"]
