"""Wall-clock timing of several contestants, interleaved.

Each repetition runs every contestant once, in an order rotated by one each repetition, so
machine drift (frequency scaling, a neighbour's load) hits every contestant alike and none always
runs first after another's allocations. Report the median of the samples.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from metakernels.benchmarks import memory


def time_interleaved(runs: dict[str, Callable[[], object]], *, repeats: int | dict[str, int],
                     warmup: int | dict[str, int] = 2, device: str | torch.device = "cpu",
                     cuda_peaks: dict[str, int] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of every ``runs[name]()``, ``repeats`` samples each, after ``warmup``
    untimed rounds. ``repeats`` and ``warmup`` may differ per name (a dict): round r then runs
    the names that still want a sample, so a slow contestant can be timed fewer times than the
    rest. On CUDA, timed with ``torch.cuda.Event`` pairs on the current stream (one
    synchronisation per round, not per call), and, when ``cuda_peaks`` is given, each call's peak
    allocation above what was allocated before it goes there (the largest over the calls); on
    the CPU with ``clock``: ``time.perf_counter`` (wall time, the default), or
    ``time.thread_time`` (this thread's CPU time: on a machine shared with other jobs, a call
    that outlasts its scheduler slice waits for them, which stretches long calls' wall times more
    than short ones'; meaningful with one torch thread only)."""
    names = list(runs)
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(names, repeats)
    warmups = warmup if isinstance(warmup, dict) else dict.fromkeys(names, warmup)
    if any(counts[name] < 1 for name in names):
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not names:
        return {}
    on_cuda = torch.device(device).type == "cuda"
    for round_ in range(max(warmups.values())):
        for name in names:
            if warmups[name] > round_:
                runs[name]()
    if on_cuda:
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(max(counts.values())):
        active = [name for name in names if counts[name] > repeat]
        shift = repeat % len(active)
        order = active[shift:] + active[:shift]
        if on_cuda:
            events = {}
            for name in order:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)

                def timed_call(run=runs[name], start=start, end=end):
                    start.record()
                    run()
                    end.record()
                if cuda_peaks is None:
                    timed_call()
                else:
                    peak = memory.cuda_peak_bytes(timed_call, device)
                    cuda_peaks[name] = max(cuda_peaks.get(name, 0), peak)
                events[name] = (start, end)
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                samples[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name in order:
                start = clock()
                runs[name]()
                samples[name].append(clock() - start)
    return samples
