"""Modules built on the ops."""

from metakernels.nn.fast_weight_linear import FastWeightLinear  # noqa: F401
from metakernels.nn.fast_weight_memory import FastWeightMemory, MemoryState  # noqa: F401
from metakernels.nn.fast_weight_mlp import FastWeightMLP  # noqa: F401
