"""The pure-PyTorch version of every op: the truth every backend and test is compared with."""

from metakernels.reference.fast_weight import fast_weight_unroll, linear_hvp

__all__ = ["fast_weight_unroll", "linear_hvp"]
