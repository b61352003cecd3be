"""The suite's cases through pytest-benchmark, so saved runs can be compared with its own tools:

    pytest bench/ --benchmark-only [--mk-quick] [--mk-device cuda] [--benchmark-save NAME]
    pytest-benchmark compare 0001 0002

One case per standard configuration (docs/conventions.md) (the sizes of `metakernels bench`: scaled
down on the CPU, and further with --mk-quick) and contestant. As in the suite, each contestant's
meta-gradient is first checked against the reference backend's in float64 on the same inputs; one
that disagrees (or cannot run here) is skipped with the reason. Not part of `make test`.
"""

from __future__ import annotations

import pytest
import torch

from metakernels.benchmarks import CONFIGS, bench, get_contestant, make_problem
from metakernels.benchmarks.correctness import TOLERANCE, max_relative_error, reference_meta_grad

# Every contestant that can exist; the ones not installed or not applicable skip themselves.
CONTESTANTS = ["metakernels:cpu", "metakernels:triton", "metakernels:cuda",
               "metakernels:reference", "torch.func", "autograd-loop", *bench.PEERS]


@pytest.fixture(scope="module")
def problems(request):
    """Inputs and the float64 reference meta-gradient of each configuration, built once."""
    device = torch.device(request.config.getoption("--mk-device"))
    quick = request.config.getoption("--mk-quick")
    cache = {}

    def get(name):
        if name not in cache:
            case = bench.spec_case(name, torch.float32, device, quick)
            problem = make_problem(case.config, case.dtype, device)
            cache[name] = case, problem, reference_meta_grad(problem)
        return cache[name]
    return get


@pytest.mark.parametrize("contestant", CONTESTANTS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_step(benchmark, problems, request, name, contestant):
    case, problem, reference = problems(name)
    device = problem.params["weight"].device
    names, skipped = bench.contestants_for(case, device, backends=None)
    if contestant not in names:
        pytest.skip(skipped.get(contestant, "not available here"))
    meta_step = get_contestant(contestant)
    error = max_relative_error(meta_step(problem), reference)
    if not error <= TOLERANCE[case.dtype]:
        pytest.skip(f"meta-gradient differs from the reference: rel. error {error:.2e}")
    benchmark.extra_info.update(config=name, **case.sizes, scaled_from=case.scaled_from,
                                contestant=contestant, dtype=case.dtype_name,
                                device=str(device), max_rel_error=error)

    def run():
        meta_step(problem)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    benchmark.pedantic(run, rounds=request.config.getoption("--mk-rounds"), warmup_rounds=1,
                       iterations=1)
