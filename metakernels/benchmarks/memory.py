"""Peak memory of one meta-step, per contestant.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the step, after a
reset, in process, during the timed calls (:func:`cuda_peak_bytes`; the largest over them).

CPU: torch's CPU allocator keeps no peak, so each contestant runs in a fresh child process
(``python -m metakernels.benchmarks.memory CONFIG CONTESTANT``), which builds the inputs, runs
the meta-step once to warm up (lazy initialisation, thread pools), then, for each of a few more
runs, returns freed heap memory to the system (``malloc_trim``), resets the resident-set
high-water mark (writing 5 to ``/proc/self/clear_refs``), runs the meta-step and takes the
increase of the mark (``VmHWM``) over the resident set before it; it reports the median. RSS
counts whole pages and the C allocator's slack: figures move by a few MiB from run to run.

Why ``VmHWM`` and not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the parent's
high-water mark into a child's ru_maxrss across fork + exec (``signal->maxrss``), and
clear_refs does not reset it, so a child of a large parent reads the parent's peak. Where the
mark cannot be reset (no writable /proc), the child falls back to the increase of ru_maxrss over
its value after building the inputs, without a warm-up: one-time costs then count, and a peak
below the inherited one reads as 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from metakernels.benchmarks.configs import CONFIGS, BenchConfig, MetaProblem, make_problem
from metakernels.benchmarks.contestants import get_contestant

CUDA_METHOD = ("torch.cuda.max_memory_allocated above the allocation before the step, after a "
               "reset, in process; the largest over the timed calls")
RESET_METHOD = ("increase of the RSS high-water mark (VmHWM) in a child process per contestant, "
                "reset via /proc/self/clear_refs after malloc_trim before each step, after a "
                "warm-up step; median of 3 steps")
NO_RESET_METHOD = ("increase of ru_maxrss in a child process per contestant over its value after "
                   "building the inputs (the mark could not be reset: includes the first step's "
                   "one-time costs, and reads 0 below the parent's inherited peak)")


@dataclass
class PeakMemory:
    """The increase of peak memory over the inputs, in bytes, and how it was measured."""

    peak_bytes: int | None
    method: str
    error: str = ""


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _release_free_heap() -> None:
    """Returns the C heap's free pages to the system, so memory the warm-up freed does not sit
    resident and absorb the next step's growth. glibc only; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel refuses (before Linux 4.0, or
    /proc not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return True


def measure_in_process_cpu(problem: MetaProblem, contestant: str, runs: int = 3) -> PeakMemory:
    """The RSS measurement of the module docstring; meant for a fresh process of its own. Each
    run is measured on its own and the median reported: the C allocator's slack varies from run
    to run."""
    meta_step = get_contestant(contestant)
    if not _reset_high_water_mark():
        before = _max_rss_bytes()
        for _ in range(runs):
            meta_step(problem)
        return PeakMemory(max(0, _max_rss_bytes() - before), NO_RESET_METHOD)
    meta_step(problem)
    increases = []
    for _ in range(runs):
        gc.collect()
        _release_free_heap()
        _reset_high_water_mark()
        before = _status_bytes("VmRSS")
        meta_step(problem)
        increases.append(max(0, _status_bytes("VmHWM") - before))
    return PeakMemory(int(statistics.median(increases)), RESET_METHOD)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Runs ``fn()`` and returns the caching allocator's peak above what was allocated before it.
    The allocator counts on the host, as tensors are allocated and freed, so this needs no
    synchronisation and can wrap a call that CUDA events are timing."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    return torch.cuda.max_memory_allocated(device) - before


def _child_command(config: BenchConfig, contestant: str, dtype: torch.dtype,
                   seed: int) -> list[str]:
    # The child runs with the parent's intra-op thread count, as the timed runs did.
    return [sys.executable, "-m", "metakernels.benchmarks.memory", config.to_json(), contestant,
            "--dtype", str(dtype).replace("torch.", ""), "--seed", str(seed),
            "--threads", str(torch.get_num_threads())]


def _child_env() -> dict[str, str]:
    """The parent's environment, with this metakernels importable whatever the working
    directory."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def measure_in_child(config: BenchConfig, contestant: str, dtype: torch.dtype = torch.float32,
                     seed: int = 0, timeout: float = 300.0) -> PeakMemory:
    """Runs the CPU measurement in a fresh child process; a failure is reported, not raised."""
    try:
        done = subprocess.run(_child_command(config, contestant, dtype, seed), env=_child_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return PeakMemory(None, RESET_METHOD, f"child timed out after {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return PeakMemory(None, RESET_METHOD, f"child exited {done.returncode}: {tail}")
    return PeakMemory(**json.loads(lines[-1]))


def measure_many(config: BenchConfig, contestants: list[str], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0,
                 workers: int | None = None) -> dict[str, PeakMemory]:
    """Peak memory of every contestant. CPU children run ``workers`` at a time (default: the
    number of cores): each measures only its own process, so they do not disturb each other's
    figures. Run this apart from any timing, which they would disturb. (On CUDA the peaks are
    taken during the timed calls instead: :func:`cuda_peak_bytes`.)"""
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(measure_in_child, config, name, dtype, seed)
                   for name in contestants}
        return {name: future.result() for name, future in futures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metakernels.benchmarks.memory",
        description="Peak CPU memory of one contestant's meta-step, measured in this process. "
                    "Prints one JSON line: peak_bytes, method.")
    parser.add_argument("config", help=f"one of {', '.join(CONFIGS)}, or a BenchConfig as JSON")
    parser.add_argument("contestant", help="e.g. metakernels:cpu, torch.func, autograd-loop")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = (CONFIGS[args.config] if args.config in CONFIGS
              else BenchConfig.from_json(args.config))
    problem = make_problem(config, getattr(torch, args.dtype), "cpu", args.seed)
    result = measure_in_process_cpu(problem, args.contestant, args.runs)
    print(json.dumps({"peak_bytes": result.peak_bytes, "method": result.method}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
