"""The ``metakernels`` command line.

``metakernels demo``: checks every available backend against the reference, then times the
fused backend beside the baselines (the reference backend, ``torch.func``, an autograd loop) on
the small SPEC.md section 6 configurations, with peak memory and each meta-gradient's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

import metakernels
from metakernels._argtypes import positive_int
from metakernels._extras import MissingExtra
from metakernels.benchmarks import CONFIGS, bench
from metakernels.benchmarks import cli as bench_cli
from metakernels.benchmarks import mlp as mlp_bench
from metakernels.benchmarks.correctness import CHECK_SIZES, TOLERANCE, check_backends
from metakernels.benchmarks.suite import format_table, machine_description, run_config
from metakernels.train import cli as train_cli

DEMO_CONFIGS = ("maml-small", "maml-ce")
DEFAULT_REPEATS, QUICK_REPEATS, QUICK_TASKS = 50, 5, 8


def version_text() -> str:
    """What ``metakernels --version`` prints: the version, what the compiled extensions were built
    against (metakernels/_build_info.py), and what runs here."""
    from metakernels import _compat

    info = _compat.load_build_info()
    if info is None:
        built = "build: unknown (no metakernels/_build_info.py: a source tree without a build)"
    else:
        arch = f"-march={info.CPU_ARCH}" if info.CPU_ARCH else "the compiler's default target"
        built = (f"built against torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA_VERSION or 'none'}"
                 f"), CPU kernels for {arch} on {info.MACHINE}, CUDA extension "
                 f"{'built' if info.CUDA_EXTENSION else 'not built'}")
    lines = [f"metakernels {metakernels.__version__}", built,
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); backends here: "
             f"cpu tensors: {', '.join(metakernels.available_backends('cpu'))}"]
    if torch.cuda.is_available():
        lines[-1] += f"; cuda tensors: {', '.join(metakernels.available_backends('cuda'))}"
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """--version, with the text made only when asked for (it looks at the backends)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version, the torch it was built against and the backends"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metakernels",
        description="Fused batched inner loops for meta-learning with exact second-order "
                    "meta-gradients.")
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="check the backends, then time them beside the baselines",
        description="Checks every available backend against the reference (float64, outputs and "
                    "every input's gradient), then times one second-order meta-step (forward + "
                    "backward) of each contestant on the SPEC.md section 6 configurations, with "
                    "peak memory and the error of its meta-gradient. Exits 1 when a backend "
                    "disagrees with the reference.")
    demo.add_argument("--quick", action="store_true",
                      help=f"a smoke run: B={QUICK_TASKS} tasks instead of the configuration's, "
                           f"{QUICK_REPEATS} repeats")
    demo.add_argument("--repeats", type=positive_int, metavar="N",
                      help=f"timed repeats per contestant (default {DEFAULT_REPEATS}, "
                           f"{QUICK_REPEATS} with --quick)")
    demo.add_argument("--config", action="append",
                      choices=sorted(CONFIGS) + sorted(mlp_bench.MLP_CONFIGS), metavar="NAME",
                      help=f"a configuration to time, repeatable; one of {', '.join(CONFIGS)}, "
                           f"or an MLP one ({', '.join(mlp_bench.MLP_CONFIGS)}) "
                           f"(default: {' '.join(DEMO_CONFIGS)})")
    demo.add_argument("--device", default="cpu", help="where to time (default cpu)")
    demo.add_argument("--threads", type=positive_int, metavar="N",
                      help="torch.set_num_threads(N) first (default: torch's choice). On a "
                           "loaded machine, intra-op threads that wait for a busy core make "
                           "timings erratic; 1 is then steadier")
    demo.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", type=Path, metavar="PATH", help="also write the records here")
    bench_cli.add_parser(commands)  # sets args.handler(args, argv)
    train_cli.add_commands(commands)  # train and analyze
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return demo(args, argv)
        if getattr(args, "handler", None) is not None:
            return args.handler(args, argv)
    except MissingExtra as error:   # one line naming the extra, not a traceback
        print(f"metakernels {args.command}: {error}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command!r}")


def _reproduce_command(argv: list[str]) -> str:
    root = Path(metakernels.__file__).resolve().parents[1]
    return f"cd {shlex.quote(str(root))} && PYTHONPATH=. {shlex.quote(sys.executable)} " \
           f"-m metakernels {shlex.join(argv)}"


def _finite_or_none(record: dict) -> dict:
    """JSON has no NaN: a backend or contestant that raised has no error figure."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def _unroll_paths(config, device: torch.device, seed: int) -> str:
    """Which algorithm each compiled backend runs on ``config`` (issue 7: the cpu backend's
    Gram-space path for mse with 3-D x), from metakernels.ops.fast_weight_unroll.unroll_path."""
    from metakernels.benchmarks import make_problem
    from metakernels.ops.fast_weight_unroll import unroll_path

    problem = make_problem(config, torch.float32, device, seed)
    params, batch = problem.params, problem.batch
    paths = [f"{backend}: " + unroll_path(
        params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
        steps=problem.steps, loss=config.loss, bias=params.get("bias"),
        queries=batch.get("readout_queries"), backend=backend)
        for backend in metakernels.available_backends(device) if backend != "reference"]
    return "algorithm: " + ("; ".join(paths) or "no compiled backend")


def demo(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    warmup = 1 if args.quick else 3
    device = torch.device(args.device)
    machine = machine_description()
    print(f"metakernels {metakernels.__version__} demo")
    print("machine:   " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"backends:  {', '.join(metakernels.available_backends(device))} on {device}")
    print(f"reproduce: {_reproduce_command(argv)}")

    sizes = " ".join(f"{k}={v}" for k, v in CHECK_SIZES.items())
    print(f"\n== backends against the reference (float64, {sizes}; outputs and the gradients "
          f"of every input; tolerance {TOLERANCE[torch.float64]:g})", flush=True)
    checks = check_backends(device, torch.float64, args.seed)
    for check in checks:
        print(f"  {check.backend:<10}{check.loss:<5}{check.case:<12}max rel. error "
              f"{check.max_error:.1e} ({check.worst})  {'PASS' if check.passed else 'FAIL'}")
    if not checks:
        print("  no backend besides the reference on this device")
    failed = [c for c in checks if not c.passed]

    all_records, sizes, mlp_records = [], [], []
    for name in args.config or DEMO_CONFIGS:
        if name in mlp_bench.MLP_CONFIGS:
            if device.type != "cpu":
                print(f"\n== {name}: skipped: the MLP benchmarks run on the CPU in this release")
                continue
            records = mlp_bench.run_config(name, quick=args.quick, repeats=repeats,
                                           measure_memory=not args.no_memory, seed=args.seed,
                                           log=lambda line: print(line, flush=True))
            mlp_records += records
            failed += [r for r in records
                       if r["contestant"].startswith("metakernels:") and not r["agrees"]]
            continue
        config = CONFIGS[name]
        if args.quick:
            config = dataclasses.replace(config, tasks=min(config.tasks, QUICK_TASKS))
        print(f"\n== {config.name}: {config.describe()} (float32, {device})", flush=True)
        records = run_config(config, repeats=repeats, warmup=warmup, dtype=torch.float32,
                             device=device, measure_memory=not args.no_memory, seed=args.seed,
                             log=lambda line: print(line, flush=True))
        print(format_table(records), flush=True)
        print(f"  {_unroll_paths(config, device, args.seed)}", flush=True)
        all_records += records
        # The sizes run and SPEC.md's where --quick cut them, as in `metakernels bench` records.
        case = bench.Case(config, torch.float32)
        sizes += [{**case.sizes, "scaled_from": case.scaled_from}] * len(records)
        # A metakernels backend that disagrees is a bug in it, not a missing baseline.
        failed += [r for r in records if r.contestant.startswith("metakernels:") and not r.agrees]

    methods = sorted({r.memory_method for r in all_records if r.memory_method})
    print("\nmedian ms: one meta-step (T inner steps, outer loss, backward to the init), median "
          "of the interleaved repeats; IQR: its spread")
    print("rel. error: max over the meta-parameters of |g - g_ref| / |g_ref|, g_ref from the "
          "reference backend in float64 on the same inputs")
    for method in methods:
        print(f"peak MiB: {method}")
    elapsed = time.perf_counter() - started
    verdict = "FAIL" if failed else "PASS"
    print(f"\n{verdict}: {len(failed)} failure(s); finished in {elapsed:.1f} s")

    if args.json:
        args.json.write_text(json.dumps({
            "command": _reproduce_command(argv), "machine": machine,
            "backend_checks": [_finite_or_none(dataclasses.asdict(c)) for c in checks],
            "results": [_finite_or_none({**dataclasses.asdict(r), **size})
                        for r, size in zip(all_records, sizes)],
            "mlp_results": [_finite_or_none(r) for r in mlp_records],
            "elapsed_s": elapsed,
        }, indent=2) + "\n")
        print(f"records written to {args.json}")
    return 1 if failed else 0
