"""Modules built on the ops."""

from metakernels.nn.fast_weight_linear import FastWeightLinear
