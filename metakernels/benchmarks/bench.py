"""``metakernels bench``: every contestant on the standard configurations (docs/conventions.md) and
on sweeps over B, T, n and d, as records, tables, a markdown report and log-log plots.

Each case (a configuration in a dtype) goes through :func:`metakernels.benchmarks.suite.run_config`:
every contestant's meta-gradient is checked against the reference backend's in float64 on the
same inputs, those that agree are timed interleaved (median; CUDA events on the GPU), then their
peak memory is measured. A metakernels backend is then paired with every other contestant that
agreed, into one record each with the fields of :data:`RECORD_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import metakernels
from metakernels.benchmarks import roofline
from metakernels.benchmarks.configs import CONFIGS, BenchConfig
from metakernels.benchmarks.contestants import BASELINES
from metakernels.benchmarks.peers import PEERS
from metakernels.benchmarks.suite import Record, run_config

RECORD_FIELDS = ("config", "tasks", "steps", "support", "d_in", "d_out", "scaled_from", "sweep",
                 "device", "dtype", "backend", "baseline", "seconds_median",
                 "baseline_seconds_median", "ratio", "peak_memory_bytes",
                 "baseline_peak_memory_bytes", "max_rel_error")
# The sizes a case may change from its row in docs/conventions.md, and their names in the text.
SIZE_FIELDS = {"tasks": "B", "steps": "T", "support": "n", "d_in": "d_in", "d_out": "d_out"}

# What the CPU here holds in a few seconds a call: the standard sizes cut where a baseline would
# take too long (the "GPU" rows) or --quick asks for less.
CPU_SIZES: dict[str, dict[str, int]] = {
    "delta-rule": dict(tasks=8, steps=128),
    "large": dict(tasks=64),
}
QUICK_SIZES: dict[str, dict[str, int]] = {
    "maml-small": dict(tasks=16),
    "maml-ce": dict(tasks=16),
    "trajectory": dict(tasks=4, steps=12),
    "delta-rule": dict(tasks=4, steps=24),
    "large": dict(tasks=8, steps=4, support=32),
}
# The sweeps: one size varied at a time around a base configuration; d sets d_in = d_out.
SWEEP_AXES = ("B", "T", "n", "d")
SWEEP_VALUES = {"B": (8, 16, 32, 64, 128), "T": (2, 4, 8, 16, 32), "n": (4, 8, 16, 32, 64),
                "d": (16, 32, 64, 128)}
QUICK_SWEEP_VALUES = {"B": (4, 8, 16), "T": (2, 4, 8), "n": (4, 8, 16), "d": (8, 16, 32)}
AXIS_FIELDS = {"B": ("tasks",), "T": ("steps",), "n": ("support",), "d": ("d_in", "d_out")}


@dataclass
class Case:
    """One configuration in one dtype; ``note`` says how it differs from its row in
    docs/conventions.md."""

    config: BenchConfig
    dtype: torch.dtype
    note: str = ""
    sweep: tuple[str, int] | None = None   # (axis, value) for a sweep point

    @property
    def label(self) -> str:
        """The configuration's name, with its changed sizes when it is not its row in
        docs/conventions.md."""
        return f"{self.config.name} ({self.note})" if self.note else self.config.name

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def sizes(self) -> dict[str, int]:
        """The sizes this case runs: ``{"tasks", "steps", "support", "d_in", "d_out"}``."""
        return {name: getattr(self.config, name) for name in SIZE_FIELDS}

    @property
    def scaled_from(self) -> dict[str, int] | None:
        """the standard configuration's value of every size this case changed (``{"tasks": 64}``),
        or None where it runs the row's sizes."""
        spec = CONFIGS.get(self.config.name)
        if spec is None:
            return None
        changed = {name: getattr(spec, name) for name in SIZE_FIELDS
                   if getattr(spec, name) != getattr(self.config, name)}
        return changed or None

    def sizes_text(self) -> str:
        """``B=16 T=5 n=16 64x64``, and the sweep's axis for a sweep point."""
        sizes = self.sizes
        text = (f"B={sizes['tasks']} T={sizes['steps']} n={sizes['support']} "
                f"{sizes['d_in']}x{sizes['d_out']}")
        return text + (f", sweep {self.sweep[0]}" if self.sweep else "")

    def scaled_from_text(self) -> str:
        """``B=64 n=25``: the standard configuration's values of the sizes this case changed; empty
        where none."""
        return " ".join(f"{SIZE_FIELDS[name]}={value}"
                        for name, value in (self.scaled_from or {}).items())


@dataclass
class CaseResult:
    case: Case
    records: list[Record]                       # one per contestant (suite.Record)
    skipped: dict[str, str]                     # contestant -> why it did not run
    work: roofline.Work | None = None
    extra: dict = field(default_factory=dict)


def resize(config: BenchConfig, sizes: dict[str, int]) -> tuple[BenchConfig, str]:
    """``config`` with ``sizes`` (BenchConfig fields), and a note of what changed."""
    changed = {name: value for name, value in sizes.items() if getattr(config, name) != value}
    if not changed:
        return config, ""
    note = "scaled: " + ", ".join(f"{SIZE_FIELDS[name]}={value} of {getattr(config, name)}"
                                  for name, value in changed.items())
    return dataclasses.replace(config, **changed), note


def spec_case(name: str, dtype: torch.dtype, device: torch.device, quick: bool) -> Case:
    """The row ``name`` of docs/conventions.md, whole on the GPU, cut to :data:`CPU_SIZES` on the
    CPU and to :data:`QUICK_SIZES` with ``quick``."""
    sizes: dict[str, int] = {}
    if device.type != "cuda":
        sizes.update(CPU_SIZES.get(name, {}))
    if quick:
        sizes.update(QUICK_SIZES.get(name, {}))
    config, note = resize(CONFIGS[name], sizes)
    return Case(config, dtype, note)


def sweep_cases(base: Case, axes: tuple[str, ...], quick: bool) -> list[Case]:
    """``base`` with one size varied at a time over :data:`SWEEP_VALUES` (the other sizes those
    of ``base``, e.g. its --quick cut)."""
    values = QUICK_SWEEP_VALUES if quick else SWEEP_VALUES
    cases = []
    for axis in axes:
        for value in values[axis]:
            config = dataclasses.replace(base.config,
                                         **{name: value for name in AXIS_FIELDS[axis]})
            note = f"sweep {axis}={value}" + (f"; {base.note}" if base.note else "")
            cases.append(Case(config, base.dtype, note, sweep=(axis, value)))
    return cases


def contestants_for(case: Case, device: torch.device,
                    backends: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The contestants of ``case``, the metakernels backends first, and the ones that cannot run
    here with their reason. ``backends``: the metakernels backends asked for (default: every one
    available on the device and dtype). The reference backend is always a contestant, as a
    baseline if not asked for."""
    available = metakernels.available_backends(device, case.dtype)
    skipped: dict[str, str] = {}
    chosen = available if backends is None else []
    for backend in backends or []:
        if backend in available:
            chosen.append(backend)
        else:
            skipped[f"metakernels:{backend}"] = (f"not available on {device.type} "
                                                 f"{case.dtype_name} (available: {available})")
    names = [f"metakernels:{b}" for b in chosen]
    if "metakernels:reference" not in names:
        names.append("metakernels:reference")
    names += list(BASELINES)
    for peer in PEERS.values():
        why = peer.unavailable(case.config, device, case.dtype)
        if why is None:
            names.append(peer.name)
        else:
            skipped[peer.name] = why
    return names, skipped


def run_case(case: Case, device: torch.device, *, backends: list[str] | None, repeats: int,
             warmup: int, measure_memory: bool, seed: int, time_budget_s: float | None,
             log: Callable[[str], None]) -> CaseResult:
    names, skipped = contestants_for(case, device, backends)
    for name, why in skipped.items():
        log(f"  skipped {name}: {why}")
    records = run_config(case.config, repeats=repeats, warmup=warmup, dtype=case.dtype,
                         device=device, measure_memory=measure_memory, seed=seed, log=log,
                         contestants=names, time_budget_s=time_budget_s)
    for record in records:
        record.config = case.label
    return CaseResult(case, records, skipped, roofline.work(case.config, case.dtype))


def short_name(contestant: str) -> str:
    """``metakernels:cpu`` -> ``cpu``: the names of the records' backend and baseline fields."""
    return contestant.split(":", 1)[1] if contestant.startswith("metakernels:") else contestant


def _peak_bytes(record: Record) -> int | None:
    return None if record.peak_mib is None else int(round(record.peak_mib * 2**20))


def pair_records(result: CaseResult, backends: list[str] | None) -> list[dict]:
    """The JSON records of one case: every metakernels backend that was asked for (default:
    every one that ran) against every other contestant that agreed with the reference."""
    agreed = [r for r in result.records if r.agrees and r.median_ms is not None]
    ours = [r for r in agreed if r.contestant.startswith("metakernels:")
            and (backends is None or short_name(r.contestant) in backends)]
    if backends is None and len(ours) > 1:
        # The reference backend is a contestant of its own only where it is all there is.
        ours = [r for r in ours if r.contestant != "metakernels:reference"]
    out = []
    for mine in ours:
        for theirs in agreed:
            if theirs is mine:
                continue
            out.append({
                "config": result.case.config.name, **result.case.sizes,
                "scaled_from": result.case.scaled_from,
                "sweep": result.case.sweep[0] if result.case.sweep else None,
                "device": mine.device, "dtype": mine.dtype,
                "backend": short_name(mine.contestant), "baseline": short_name(theirs.contestant),
                "seconds_median": mine.median_ms / 1e3,
                "baseline_seconds_median": theirs.median_ms / 1e3,
                "ratio": theirs.median_ms / mine.median_ms,
                "peak_memory_bytes": _peak_bytes(mine),
                "baseline_peak_memory_bytes": _peak_bytes(theirs),
                "max_rel_error": mine.rel_error,
            })
    return out


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def ratio_to(records: list[Record], record: Record, baseline: str) -> float | None:
    """How many times faster ``record`` is than ``baseline`` (its time / ours), or None."""
    theirs = next((r for r in records if r.contestant == baseline and r.median_ms), None)
    if theirs is None or record.median_ms is None:
        return None
    return theirs.median_ms / record.median_ms


def markdown_rows(result: CaseResult, ceilings: roofline.Ceilings | None) -> list[str]:
    """The markdown table rows of one case: every contestant that agreed, then the rest with
    their reason."""
    rows = []
    case = result.case
    # The configuration's bare name, then its sizes and the standard ones where they differ.
    title = f"| {case.config.name} | {case.sizes_text()} | {case.scaled_from_text()} |"
    for r in result.records:
        if not r.agrees:
            continue
        fraction = tf32 = None
        if ceilings is not None and r.median_ms:
            fraction = roofline.achieved_fraction(case.config, case.dtype, r.median_ms / 1e3,
                                                  ceilings)
            if case.dtype == torch.float32 and "float32-tf32" in ceilings.matmul_flops_per_s:
                tf32 = roofline.achieved_fraction(case.config, case.dtype, r.median_ms / 1e3,
                                                  ceilings, tf32=True)
        roof = _format(fraction, ".1%") + (f" ({tf32:.1%})" if tf32 is not None else "")
        rows.append(
            f"{title} {case.dtype_name} | {short_name(r.contestant)} | "
            f"{_format(r.median_ms, '.3f')} | "
            f"{_format(ratio_to(result.records, r, 'torch.func'), '.2f')} | "
            f"{_format(ratio_to(result.records, r, 'metakernels:reference'), '.2f')} | "
            f"{roof} | {_format(r.peak_mib, '.1f')} | {r.rel_error:.1e} |")
    for r in result.records:
        if not r.agrees:
            rows.append(f"{title} {case.dtype_name} | {short_name(r.contestant)} | "
                        f"left out: {r.reason} | | | | | |")
    for name, why in result.skipped.items():
        rows.append(f"{title} {case.dtype_name} | {short_name(name)} | "
                    f"skipped: {why} | | | | | |")
    return rows


MARKDOWN_HEADER = (
    "| config | sizes | scaled from | dtype | contestant | ms | × vs torch.func | × vs reference "
    "| roofline | peak MiB | rel. error |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")


def markdown_report(results: list[CaseResult], ceilings: roofline.Ceilings | None,
                    machine: dict, command: str) -> str:
    """The whole report: what ran where, the table, the ceilings and each case's work model."""
    lines = ["# metakernels bench", "", f"Command: `{command}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    if ceilings is not None:
        lines += [f"Ceilings, measured in this run: {ceilings.describe()}.", ""]
    lines += [MARKDOWN_HEADER]
    for result in results:
        lines += markdown_rows(result, ceilings)
    lines += ["",
              "config: the standard configuration's row (docs/conventions.md); sizes: those run "
              "(B tasks, T inner steps, n support rows, d_in x d_out); scaled from: the standard "
              "configuration's value of each size cut or changed here. "
              "ms: median of one meta-step (forward + backward of the whole second-order "
              "meta-gradient), contestants interleaved; × vs X: X's median / this one's (above 1: "
              "faster than X); rel. error: of the meta-gradient against the reference backend "
              "in float64 on the same inputs; peak MiB: see the memory note below.",
              ]
    if ceilings is not None:
        lines += ["roofline: the floor max(FLOPs / matmul rate, bytes / copy bandwidth) (the "
                  "better of storing or recomputing W_t; model in "
                  "metakernels/benchmarks/roofline.py) over the measured time; in brackets "
                  "against the TF32 matmul rate.", "",
                  "| config | sizes | scaled from | dtype | GFLOP | +recompute GFLOP "
                  "| compulsory MB | W_t states MB | floor ms |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for result in results:
            w, case = result.work, result.case
            floor = w.floor_seconds(ceilings.matmul_rate(case.dtype), ceilings.copy_bytes_per_s)
            lines.append(f"| {case.config.name} | {case.sizes_text()} | "
                         f"{case.scaled_from_text()} | {case.dtype_name} | {w.flops / 1e9:.2f} | "
                         f"{w.recompute_flops / 1e9:.2f} | {w.io_bytes / 1e6:.1f} | "
                         f"{w.state_bytes / 1e6:.1f} | {floor * 1e3:.4f} |")
    methods = sorted({r.memory_method for res in results for r in res.records
                      if r.memory_method})
    lines += [""] + [f"Peak memory: {method}." for method in methods]
    return "\n".join(lines) + "\n"
