"""One configuration end to end: check every contestant against the reference, time the ones
that agree (interleaved), measure their peak memory, and lay the records out as a table."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from metakernels.benchmarks import memory, timing
from metakernels.benchmarks.configs import BenchConfig, make_problem
from metakernels.benchmarks.contestants import contestant_names, get_contestant
from metakernels.benchmarks.correctness import (TOLERANCE, max_relative_error,
                                                reference_meta_grad)


@dataclass
class Record:
    """One contestant on one configuration. Times in ms; ``ratio`` is this contestant's median
    over the baseline's (how many times faster the baseline is); ``rel_error`` the largest
    relative error of its meta-gradient against the float64 reference."""

    config: str
    contestant: str
    baseline: str
    dtype: str
    device: str
    rel_error: float
    agrees: bool
    reason: str = ""
    median_ms: float | None = None
    iqr_ms: float | None = None
    ratio: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    memory_method: str = ""
    memory_error: str = ""


def run_config(config: BenchConfig, *, repeats: int, warmup: int = 3,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               measure_memory: bool = True, seed: int = 0,
               log: Callable[[str], None] = print, contestants: list[str] | None = None,
               time_budget_s: float | None = None, min_repeats: int = 3) -> list[Record]:
    """Records for every contestant on ``config`` (default: :func:`contestant_names`); the
    baseline is the first of them, the fastest metakernels backend of the device. A contestant
    whose meta-gradient disagrees with the reference (or that raises, e.g. runs out of memory) is
    recorded with ``agrees=False`` and its reason, and neither timed nor measured.

    ``time_budget_s``: each contestant gets an equal share of about this many seconds of
    timing. After its check it is called once more on its own (a warm sample that measures its
    speed), then it joins the interleaved rounds for as many samples as its share holds, between
    ``min_repeats`` and ``repeats``; one slower than its whole share keeps the one warm sample.
    This is for slow baselines at full size (torch.func over T = 1024 steps takes seconds).

    Peak memory: on CUDA, during the timed calls (``memory.cuda_peak_bytes``); on the CPU in a
    child process per contestant afterwards."""
    device = torch.device(device)
    names = contestants if contestants is not None else contestant_names(device)
    baseline = names[0]
    dtype_name = str(dtype).replace("torch.", "")
    problem = make_problem(config, dtype, device, seed)
    log(f"  checking {len(names)} contestants against the reference meta-gradient "
        f"(float64, same inputs; tolerance {TOLERANCE[dtype]:g})")
    reference = reference_meta_grad(problem)
    records: dict[str, Record] = {}
    for name in names:
        record = Record(config.name, name, baseline, dtype_name, str(device), math.nan, False)
        try:
            meta_grad = get_contestant(name)(problem)
            record.rel_error = max_relative_error(meta_grad, reference)
            del meta_grad
        except Exception as error:  # a baseline that cannot run here is left out, not fatal
            record.reason = f"raised {type(error).__name__}: {_first_line(error)}"
            _release(device)
        else:
            record.agrees = record.rel_error <= TOLERANCE[dtype]
            if not record.agrees:
                record.reason = (f"meta-gradient differs from the reference: rel. error "
                                 f"{record.rel_error:.2e} > {TOLERANCE[dtype]:g}")
        if not record.agrees:
            log(f"  left out {name}: {record.reason}")
        records[name] = record
    timed = [name for name in names if records[name].agrees]
    meta_steps = {name: get_contestant(name) for name in timed}
    runs = {name: (lambda meta_step=meta_steps[name]: meta_step(problem)) for name in timed}
    cuda_peaks: dict[str, int] | None = {} if measure_memory and device.type == "cuda" else None
    probes: dict[str, float] = {}
    counts: dict[str, int] | int = repeats
    warmups: dict[str, int] | int = warmup
    if time_budget_s is not None and timed:
        # One warm call each, timed on its own: it sets the contestant's share of the budget and
        # is its first sample. A contestant slower than its share is timed fewer times.
        share = time_budget_s / len(timed)
        for name in list(timed):
            try:
                probes[name] = _timed_call(runs[name], device, cuda_peaks, name)
            except Exception as error:  # e.g. out of memory beside the others' leftovers
                records[name].agrees = False
                records[name].reason = f"raised {type(error).__name__}: {_first_line(error)}"
                log(f"  left out {name}: {records[name].reason}")
                timed.remove(name)
                _release(device)
        counts = {name: max(0 if probes[name] > share else min_repeats - 1,
                            min(repeats - 1, int(share / probes[name]) - 1))
                  for name in timed}
        warmups = {name: warmup if probes[name] * (warmup + 1) < share else 0 for name in timed}
        shown = ", ".join(f"{name} {counts[name] + 1}" for name in timed)
        log(f"  timing {len(timed)} contestants, samples each (one warm call, then "
            f"{max(counts.values(), default=0)} interleaved rounds at most, in a "
            f"{time_budget_s:g} s budget): {shown}")
    else:
        log(f"  timing {len(timed)} contestants: {repeats} interleaved repeats after "
            f"{warmup} warm-up rounds")
    to_time = [name for name in timed if not isinstance(counts, dict) or counts[name] > 0]
    samples = timing.time_interleaved(
        {name: runs[name] for name in to_time},
        repeats=counts if not isinstance(counts, dict) else {n: counts[n] for n in to_time},
        warmup=warmups if not isinstance(warmups, dict) else {n: warmups[n] for n in to_time},
        device=device, cuda_peaks=cuda_peaks) if to_time else {}
    for name in timed:
        seconds = ([probes[name]] if name in probes else []) + samples.get(name, [])
        ms = [1e3 * s for s in seconds]
        record = records[name]
        record.times_ms, record.median_ms = ms, statistics.median(ms)
        if len(ms) >= 4:
            quartiles = statistics.quantiles(ms, n=4)
            record.iqr_ms = quartiles[2] - quartiles[0]
        if cuda_peaks is not None and name in cuda_peaks:
            record.memory_method = memory.CUDA_METHOD
            record.peak_mib = cuda_peaks[name] / 2**20
    if baseline in records and records[baseline].median_ms:
        for name in timed:
            records[name].ratio = records[name].median_ms / records[baseline].median_ms
    del problem, reference
    _release(device)

    if measure_memory and timed and device.type != "cuda":
        log(f"  peak memory of {len(timed)} contestants (one child process each)")
        for name, peak in memory.measure_many(config, timed, dtype, device, seed).items():
            record = records[name]
            record.memory_method, record.memory_error = peak.method, peak.error
            if peak.peak_bytes is not None:
                record.peak_mib = peak.peak_bytes / 2**20
    return list(records.values())


def _timed_call(run: Callable[[], object], device: torch.device,
                cuda_peaks: dict[str, int] | None, name: str) -> float:
    """Seconds of one call, synchronised; its CUDA peak allocation goes into ``cuda_peaks``."""
    _synchronize(device)
    started = time.perf_counter()
    if cuda_peaks is None:
        run()
    else:
        cuda_peaks[name] = max(cuda_peaks.get(name, 0), memory.cuda_peak_bytes(run, device))
    _synchronize(device)
    return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Frees what a failed or finished contestant left cached on the GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def format_table(records: list[Record]) -> str:
    """The contestants that agree, side by side; the ones left out below, with their reason."""
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    baseline = records[0].baseline
    header = (f"  {'contestant':<24}{'median ms':>11}{'IQR ms':>9}{'ratio':>8}"
              f"{'peak MiB':>10}{'rel. error':>12}")
    lines = [header, "  " + "-" * (len(header) - 2)]
    for r in records:
        if r.agrees:
            lines.append(f"  {r.contestant:<24}{number(r.median_ms, '.3f'):>11}"
                         f"{number(r.iqr_ms, '.3f'):>9}{number(r.ratio, '.2f'):>8}"
                         f"{number(r.peak_mib, '.1f'):>10}{r.rel_error:>12.1e}")
    for r in records:
        if not r.agrees:
            lines.append(f"  {r.contestant:<24}left out: {r.reason}")
        elif r.memory_error:
            lines.append(f"  {r.contestant:<24}peak memory not measured: {r.memory_error}")
    lines.append(f"  ratio = median / median of {baseline} (how many times faster {baseline} is)")
    return "\n".join(lines)


def machine_description() -> dict[str, str | int]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            models = [line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    description: dict[str, str | int] = {
        "cpu": cpu, "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name()
    return description

