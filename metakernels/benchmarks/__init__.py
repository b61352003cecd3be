"""The benchmark harness behind ``metakernels demo``: the standard configurations
(docs/conventions.md), the contestants that compute the same second-order meta-gradient, their
correctness checks against the reference backend, interleaved timing, and peak memory.

Every figure is forward + backward of the whole meta-step and is quoted as a ratio against the
fused backend measured in the same run on the same machine.
"""

from metakernels.benchmarks.configs import CONFIGS, BenchConfig, MetaProblem, make_problem
from metakernels.benchmarks.contestants import contestant_names, get_contestant

__all__ = ["CONFIGS", "BenchConfig", "MetaProblem", "contestant_names", "get_contestant",
           "make_problem"]
