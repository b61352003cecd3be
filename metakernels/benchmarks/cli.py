"""``metakernels bench``: the benchmark suite's command line (registered by metakernels/cli.py).

    metakernels bench [--config NAME[:DTYPE] ...] [--backend NAME ...] [--device D] [--quick]
                      [--json PATH] [--markdown PATH] [--plot DIR] [--roofline]

Prints a table per case; ``--json`` writes the list of records of
:data:`metakernels.benchmarks.bench.RECORD_FIELDS`; ``--markdown`` the report (with the roofline
columns when the ceilings were measured); ``--plot`` runs the sweeps over B, T, n and d and draws
them. Exits 1 when a metakernels backend disagrees with the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import metakernels
from metakernels import _extras
from metakernels._argtypes import positive_float, positive_int
from metakernels.benchmarks import bench, mlp, plots, roofline
from metakernels.benchmarks.configs import CONFIGS
from metakernels.benchmarks.mlp import MLP_CONFIGS
from metakernels.benchmarks.suite import format_table, machine_description

DEFAULT_CONFIGS = tuple(CONFIGS)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DEFAULT_REPEATS, QUICK_REPEATS = 30, 5
# Seconds of timed rounds per case, at most: the slow baselines at full size get fewer repeats.
DEFAULT_BUDGET_S, QUICK_BUDGET_S = 20.0, 1.5


def _config_spec(text: str) -> tuple[str, str | None]:
    name, _, dtype = text.partition(":")
    if name in MLP_CONFIGS and not dtype:
        return name, None
    if name not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown configuration {name!r}; expected one of "
                                         f"{', '.join(CONFIGS)} (optionally NAME:DTYPE), or an "
                                         f"MLP one: {', '.join(MLP_CONFIGS)}")
    if dtype and dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r} in {text!r}; expected one of "
                                         f"{', '.join(DTYPES)}")
    return name, dtype or None


def add_parser(commands) -> argparse.ArgumentParser:
    """Adds ``bench`` to the ``metakernels`` subcommands; its handler is ``args.handler``."""
    parser = commands.add_parser(
        "bench", help="the benchmark suite: every contestant, sweeps, plots, roofline",
        description="Times one second-order meta-step (forward + backward) of each metakernels "
                    "backend beside the reference backend, torch.func, an autograd loop and "
                    "the optional peers (higher, learn2learn, torchopt, flash-linear-attention), "
                    "after checking each meta-gradient against the reference in float64.")
    parser.add_argument("--config", action="append", type=_config_spec, metavar="NAME[:DTYPE]",
                        help=f"a configuration, repeatable; one of {', '.join(CONFIGS)}, "
                             "optionally with its own dtype (e.g. delta-rule:bfloat16), or one "
                             f"of the MLP ones ({', '.join(MLP_CONFIGS)}; float32, "
                             "metakernels.benchmarks.mlp). Default: all but the MLP ones; the "
                             "GPU rows are scaled down on the CPU, which the output says")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="a metakernels backend to time, repeatable (default: every one "
                             "available); the reference backend is always timed as a baseline")
    parser.add_argument("--device", default="cpu", help="where to run (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="the dtype of configurations given without one (default float32)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller sizes, {QUICK_REPEATS} repeats, no memory column: a smoke "
                             "run (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--repeats", type=positive_int, metavar="N",
                        help=f"timed repeats per contestant, at most (default {DEFAULT_REPEATS}, "
                             f"{QUICK_REPEATS} with --quick)")
    parser.add_argument("--time-budget", type=positive_float, metavar="S",
                        help="seconds of timed rounds per case: fewer repeats (at least 3) where "
                             f"a round is slow (default {DEFAULT_BUDGET_S:g}, {QUICK_BUDGET_S:g} "
                             "with --quick)")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="also run the sweeps over B, T, n and d and write log-log PNGs of "
                             "time and memory with fitted slopes here")
    parser.add_argument("--sweep", action="append", choices=bench.SWEEP_AXES,
                        help="a sweep axis, repeatable (default with --plot: all)")
    parser.add_argument("--sweep-config", default="maml-small", choices=CONFIGS,
                        help="the configuration the sweeps vary (default maml-small)")
    parser.add_argument("--sweeps-only", action="store_true",
                        help="run the sweeps and not the SPEC.md configurations")
    parser.add_argument("--roofline", action="store_true",
                        help="measure the matmul rate and copy bandwidth first and report each "
                             "time's fraction of the roofline floor (default on CUDA)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory (default: yes, but not with --quick)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch.set_num_threads(N) first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write the records (a JSON list) here")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help="write the markdown report here")
    parser.set_defaults(handler=run)
    return parser


def _reproduce_command(argv: list[str]) -> str:
    return f"python -m metakernels {shlex.join(argv)}"


def _json_ready(value):
    """JSON has no NaN or infinity: such a figure is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.plot:   # before anything runs, not after the sweeps
        _extras.require("--plot", "matplotlib", extra="bench")
    quick = args.quick
    repeats = args.repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    budget = args.time_budget or (QUICK_BUDGET_S if quick else DEFAULT_BUDGET_S)
    measure_memory = (not quick) if args.memory is None else args.memory
    warmup = 1 if quick else 3
    machine = machine_description()
    command = _reproduce_command(argv)
    print(f"metakernels {metakernels.__version__} bench")
    print("machine:   " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"backends:  {', '.join(metakernels.available_backends(device))} on {device}")
    print(f"reproduce: {command}", flush=True)

    ceilings = None
    if args.roofline or device.type == "cuda":
        ceilings = roofline.measure_ceilings(device)
        print(f"ceilings:  {ceilings.describe()}", flush=True)

    chosen = args.config or [(name, None) for name in DEFAULT_CONFIGS]
    mlp_names = [name for name, _ in chosen if name in MLP_CONFIGS]
    cases = [bench.spec_case(name, DTYPES[dtype or args.dtype], device, quick)
             for name, dtype in chosen if name not in MLP_CONFIGS]
    axes = tuple(args.sweep or (bench.SWEEP_AXES if args.plot or args.sweeps_only else ()))
    if args.sweeps_only:
        cases = []
    sweep_base = bench.spec_case(args.sweep_config, DTYPES[args.dtype], device, quick)
    sweep_cases = bench.sweep_cases(sweep_base, axes, quick)

    results, failed, errors = [], [], []
    for case in cases + sweep_cases:
        if device.type == "cpu" and case.dtype in (torch.bfloat16, torch.float16):
            print(f"\n== {case.label} ({case.dtype_name}): skipped: metakernels runs float32 "
                  "and float64 on the CPU (SPEC.md section 3)", flush=True)
            continue
        print(f"\n== {case.label}: {case.config.describe()} ({case.dtype_name}, {device})",
              flush=True)
        try:
            result = bench.run_case(case, device, backends=args.backend, repeats=repeats,
                                    warmup=warmup, measure_memory=measure_memory,
                                    seed=args.seed, time_budget_s=budget,
                                    log=lambda line: print(line, flush=True))
        except Exception as error:  # one case that cannot run (e.g. out of memory) is reported
            print(f"  case failed: {type(error).__name__}: {error}", flush=True)
            errors.append(case.label)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(format_table(result.records), flush=True)
        results.append(result)
        failed += [r for r in result.records
                   if r.contestant.startswith("metakernels:") and not r.agrees]
        # Written after every case, so a run cut short by a time limit keeps what it measured.
        records, report = _outputs(args, results, axes, ceilings, machine, command, final=False)
        _write(args, records, report, quiet=True)

    mlp_records = []
    for name in mlp_names:
        if device.type != "cpu":
            print(f"\n== {name}: skipped: the MLP benchmarks run on the CPU in this release")
            continue
        mlp_records += mlp.run_config(name, quick=quick, repeats=repeats, backends=args.backend,
                                      measure_memory=measure_memory, seed=args.seed,
                                      log=lambda line: print(line, flush=True))
    failed += [r for r in mlp_records
               if r["contestant"].startswith("metakernels:") and not r["agrees"]]

    records, report = _outputs(args, results, axes, ceilings, machine, command, final=True)
    if mlp_records:
        records += [{k: _json_ready(v) for k, v in r.items()} for r in mlp_records]
        report += "\n## MLP fast weights\n\n" + mlp.format_records(mlp_records) + "\n"
    elapsed = time.perf_counter() - started
    print(f"\n{'FAIL' if failed or errors else 'PASS'}: {len(failed)} metakernels backend(s) "
          f"disagreed with the reference; {len(errors)} case(s) failed to run"
          f"{' (' + ', '.join(errors) + ')' if errors else ''}; {len(records)} records; "
          f"finished in {elapsed:.1f} s")
    _write(args, records, report, quiet=False)
    return 1 if failed or errors else 0


def _outputs(args, results, axes, ceilings, machine, command, final: bool) -> tuple[list, str]:
    """The JSON records and the markdown report of the cases run so far; the sweeps' slopes and
    plots once all have run (``final``)."""
    records = [{k: _json_ready(v) for k, v in record.items()}
               for result in results for record in bench.pair_records(result, args.backend)]
    report = bench.markdown_report(results, ceilings, machine, command)
    if not final:
        return records, report + "\n(partial: the run has not finished)\n"
    sweep_results = [r for r in results if r.case.sweep is not None]
    if axes and sweep_results:
        table = plots.slopes(sweep_results, axes)
        print(f"\n== fitted log-log slopes (cost ~ size^k) over the sweeps of "
              f"{args.sweep_config}\n{plots.slopes_markdown(table)}")
        report += (f"\n## Scaling: sweeps of {args.sweep_config}, one size at a time\n\n"
                   f"Fitted log-log slopes k of cost ~ size^k:\n\n{plots.slopes_markdown(table)}\n")
        if args.plot:
            for path in plots.plot_sweeps(sweep_results, axes, args.plot,
                                          f"{args.sweep_config} on {args.device}"):
                print(f"plot written to {path}")
                where = args.markdown.resolve().parent if args.markdown else Path.cwd()
                report += f"\n![{path.stem}]({os.path.relpath(path.resolve(), where)})\n"
    return records, report


def _write(args, records: list, report: str, quiet: bool) -> None:
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        if not quiet:
            print(f"records written to {args.json}")
    if args.markdown:
        args.markdown.write_text(report)
        if not quiet:
            print(f"report written to {args.markdown}")
