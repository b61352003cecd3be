"""Wall-clock timing of several contestants, interleaved.

Each repetition runs every contestant once, in an order rotated by one each repetition, so
machine drift (frequency scaling, a neighbour's load) hits every contestant alike and none always
runs first after another's allocations. Report the median of the samples.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def time_interleaved(runs: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                     device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds per call of every ``runs[name]()``, ``repeats`` samples each, after ``warmup``
    untimed rounds. On CUDA, timed with ``torch.cuda.Event`` pairs on the current stream (one
    synchronisation per round, not per call); on the CPU with ``time.perf_counter``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(runs)
    if not names:
        return {}
    on_cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for name in names:
            runs[name]()
    if on_cuda:
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        order = names[shift:] + names[:shift]
        if on_cuda:
            events = {}
            for name in order:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                runs[name]()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                samples[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name in order:
                start = time.perf_counter()
                runs[name]()
                samples[name].append(time.perf_counter() - start)
    return samples

