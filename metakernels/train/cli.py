"""The trainer's command line: ``metakernels train`` (also ``python -m metakernels.train``, which
``torchrun`` launches) and ``metakernels analyze trajectory-loss``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from metakernels._argtypes import positive_float, positive_int
from metakernels._extras import MissingExtra
from metakernels.train.tasks import ALGORITHMS, TASKS


TRAIN_DESCRIPTION = ("Meta-trains on a task family and evaluates the meta-init on held-out tasks. "
                     "Under torchrun (python -m metakernels.train) the task batch is split "
                     "across ranks.")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="sinusoid",
                        help="sinusoid regression, N-way K-shot classification, or reasoning "
                             "trajectories as inner loops (default sinusoid)")
    parser.add_argument("--algo", choices=ALGORITHMS, default="maml",
                        help="maml (second order), fomaml, metasgd, anil, reptile (default maml)")
    parser.add_argument("--steps", type=positive_int, required=True, metavar="N",
                        help="total meta-steps (with --resume: continue up to N)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the run's folder: metrics.jsonl, summary.json, checkpoint.pt, "
                             "curves.png")
    parser.add_argument("--seed", type=int, help="model init and training tasks (default 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in DIR from its checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--adapt", choices=("head", "all", "all-generic"),
                        help="head: only the linear head adapts, through the fused op "
                             "(default); all: every parameter adapts, through the fused MLP op "
                             "(fast_weight_mlp_unroll); all-generic: every parameter adapts, "
                             "through torch.func (for comparison)")
    parser.add_argument("--meta-batch", type=positive_int, metavar="B",
                        help="tasks per meta-step, split across ranks (default: the task's)")
    parser.add_argument("--inner-steps", type=positive_int, metavar="T",
                        help="inner steps per task (default: the task's)")
    parser.add_argument("--inner-lr", type=positive_float, metavar="LR",
                        help="inner learning rate (default: the task's; sinusoid: 0.1 for "
                             "the head, 0.01 when every layer adapts)")
    parser.add_argument("--meta-lr", type=positive_float, metavar="LR",
                        help="Adam's learning rate in the outer loop (default: the task's)")
    parser.add_argument("--eval-tasks", type=positive_int, metavar="N",
                        help="held-out tasks in the final evaluation (default: the task's)")
    parser.add_argument("--log-every", type=positive_int, default=10, metavar="N",
                        help="a metrics.jsonl line every N steps (default 10)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="N",
                        help="a checkpoint every N steps (default 100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="torch.set_num_threads(N) first (default 1: these models are too "
                             "small for intra-op threads to pay, and on a shared machine threads "
                             "that wait for a busy core slow them many times over; measured in "
                             "bench/results/train-sinusoid-2026-11-27)")
    reasoning = parser.add_argument_group("reasoning task")
    reasoning.add_argument("--trajectories", type=positive_int, metavar="K",
                           help="trajectories per question: the support-set size (default 1)")
    reasoning.add_argument("--trajectory-length", type=positive_int, metavar="L",
                           help="steps of each arithmetic chain and its trajectory (default 4)")
    reasoning.add_argument("--no-trajectory", action="store_const", const=True,
                           help="answer from the question alone: no inner loop")
    reasoning.add_argument("--answer-every-step", action="store_const", const=True,
                           help="train the answer read out after every prefix of the trajectory "
                                "(averaged), not only after the whole trajectory")


def config_from_args(args: argparse.Namespace):
    from metakernels.train.config import TrainConfig
    return TrainConfig(
        task=args.task, algo=args.algo, steps=args.steps, out=args.out, seed=args.seed,
        resume=args.resume, device=args.device, adapt=args.adapt, meta_batch=args.meta_batch,
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
        eval_tasks=args.eval_tasks, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
        threads=args.threads,
        trajectories=args.trajectories, trajectory_length=args.trajectory_length,
        no_trajectory=args.no_trajectory, answer_every_step=args.answer_every_step)


@contextlib.contextmanager
def _distributed(device: str):
    """``torch.distributed`` for the ranks that ``torchrun`` starts (WORLD_SIZE > 1): gloo on the
    CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch.distributed as dist
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from metakernels.train.loop import NonFiniteLoss, train
    config = config_from_args(args)
    try:
        with _distributed(config.device):
            summary = train(config)
    except ValueError as error:
        print(f"metakernels train: error: {error}", file=sys.stderr)
        return 2
    except MissingExtra as error:
        print(f"metakernels train: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"metakernels train: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from metakernels.train import checkpoint
        from metakernels.train.loop import CHECKPOINT
        path = os.path.join(config.out, CHECKPOINT)
        kept = (f"the checkpoint {path} (step {checkpoint.load(path)['step']}) is intact; "
                "--resume continues from it" if os.path.exists(path) else "no checkpoint yet")
        print(f"\nmetakernels train: interrupted; {kept}", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    analyses = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    curve = analyses.add_parser(
        "trajectory-loss", help="the answer loss along the trajectory of a trained reasoning run",
        description="For a trained --task reasoning run: the loss of the answer read out after "
                    "each prefix of the trajectory (0, 1, ..., L chunks), on correct "
                    "trajectories and on corrupted ones (one wrong step, then propagated), "
                    "averaged over held-out questions, drawn as a PNG.")
    curve.add_argument("--run", required=True, metavar="DIR", help="the run's folder")
    curve.add_argument("--questions", type=positive_int, default=500, metavar="N",
                       help="held-out questions to average over (default 500)")
    curve.add_argument("--output", metavar="PNG",
                       help="where to draw it (default DIR/trajectory_loss.png)")


def run_analyze(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from metakernels.train.trajectory_loss import trajectory_loss_command
    try:
        return trajectory_loss_command(args.run, questions=args.questions, output=args.output)
    except ValueError as error:
        print(f"metakernels analyze: error: {error}", file=sys.stderr)
        return 2


def add_commands(commands) -> None:
    """Registers ``train`` and ``analyze`` on the ``metakernels`` command line's subparsers."""
    train = commands.add_parser(
        "train", help="meta-train a model whose inner loops run through the fused ops",
        description=TRAIN_DESCRIPTION)
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    analyze = commands.add_parser("analyze", help="measurements of trained runs")
    add_analyze_arguments(analyze)
    analyze.set_defaults(handler=run_analyze)


def main(argv: list[str] | None = None) -> int:
    """``python -m metakernels.train``: the arguments of ``metakernels train``."""
    parser = argparse.ArgumentParser(prog="python -m metakernels.train",
                                     description=TRAIN_DESCRIPTION)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
