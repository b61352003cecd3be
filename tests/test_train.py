"""The trainer: every task × algorithm that makes sense runs and writes valid outputs; resume is
bitwise; checkpoints are atomic; non-finite losses stop the run; bad settings are refused."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from metakernels.cli import main as metakernels_main
from metakernels.train import NonFiniteLoss, TrainConfig, checkpoint, train
from metakernels.train.tasks import ALGORITHMS, TASKS, make_task

SUMMARY_KEYS = {"task", "algo", "steps", "seconds_per_step", "eval"}
METRIC_KEYS = {"step", "outer_loss", "inner_loss_first", "inner_loss_last"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(task: str, algo: str, out, **changes) -> TrainConfig:
    """A run small enough for a test: a few tasks, few steps, a short evaluation."""
    settings = dict(task=task, algo=algo, steps=3, out=str(out), meta_batch=4, inner_steps=2,
                    eval_tasks=4, log_every=1, checkpoint_every=2, progress=False)
    if task in ("reasoning", "walk"):
        settings.update(inner_steps=None, trajectory_length=2)
    settings.update(changes)
    return TrainConfig(**settings)


def _checked():
    """(task, algo, adapt, the trainer's refusal or None) for every combination."""
    for task in TASKS:
        for algo in ALGORITHMS:
            for adapt in ("head", "all"):
                try:
                    make_task(task).check(algo, adapt)
                except ValueError as error:
                    yield task, algo, adapt, str(error)
                else:
                    yield task, algo, adapt, None


def combinations():
    """(task, algo, adapt) for every combination the trainer accepts."""
    return [(task, algo, adapt) for task, algo, adapt, error in _checked() if error is None]


def rejected():
    """(task, algo, adapt, message) for every combination the trainer refuses."""
    return [case for case in _checked() if case[3] is not None]


def check_outputs(out: pathlib.Path, config: TrainConfig, classification: bool) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert (summary["task"], summary["algo"], summary["steps"]) == (config.task, config.algo,
                                                                    config.steps)
    assert summary["seconds_per_step"] > 0
    eval_keys = {"query_loss_before_adapt", "query_loss_after_adapt"}
    if classification:
        eval_keys.add("query_accuracy_after_adapt")
        assert 0 <= summary["eval"]["query_accuracy_after_adapt"] <= 1
    assert set(summary["eval"]) == eval_keys
    assert all(math.isfinite(v) for v in summary["eval"].values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, config.steps + 1))
    for record in records:
        assert METRIC_KEYS <= set(record)
        assert all(math.isfinite(record[k]) for k in METRIC_KEYS)
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == config.steps
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint was left behind"
    return summary


@pytest.mark.parametrize("task, algo, adapt", list(combinations()))
def test_every_combination_trains_and_writes_outputs(tmp_path, task, algo, adapt):
    config = tiny(task, algo, tmp_path, adapt=adapt)
    summary = train(config)
    check_outputs(tmp_path, config, classification=task != "sinusoid")
    assert summary == json.loads((tmp_path / "summary.json").read_text())


def test_rejected_combinations_say_why(tmp_path):
    cases = list(rejected())
    assert {(t, a, m) for t, a, m, _ in cases} >= {("sinusoid", "anil", "all"),
                                                  ("fewshot", "anil", "all")}
    for task, algo, adapt, reason in cases:
        assert algo in reason or "adapt" in reason
        with pytest.raises(ValueError, match="does not apply|adapts only the head"):
            train(tiny(task, algo, tmp_path / f"{task}-{algo}-{adapt}", adapt=adapt))


def test_training_lowers_the_adapted_loss(tmp_path):
    """30 meta-steps of ANIL on 5-way 5-shot tasks: adapting the head to a task's support set
    beats chance by far on held-out tasks of unseen classes; the unadapted init cannot."""
    summary = train(tiny("fewshot", "anil", tmp_path, steps=30, inner_steps=5, eval_tasks=40,
                         log_every=10, checkpoint_every=30))
    assert summary["eval"]["query_loss_after_adapt"] < 0.85 * summary["eval"][
        "query_loss_before_adapt"]
    assert summary["eval"]["query_accuracy_after_adapt"] > 0.5


def _state(out: pathlib.Path) -> dict:
    return checkpoint.load(out / "checkpoint.pt")


def _assert_bitwise(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("task, algo, adapt", [("sinusoid", "metasgd", "head"),
                                               ("sinusoid", "maml", "all"),
                                               ("fewshot", "reptile", "head"),
                                               ("reasoning", "metasgd", "head")])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, task, algo, adapt):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(tiny(task, algo, whole, adapt=adapt, steps=5, checkpoint_every=5))
    train(tiny(task, algo, part, adapt=adapt, steps=2, checkpoint_every=1))
    # The resumed run takes its settings from the checkpoint.
    train(TrainConfig(task=task, algo=algo, steps=5, out=str(part), resume=True,
                      log_every=1, checkpoint_every=5, progress=False))
    a, b = _state(whole), _state(part)
    assert a["step"] == b["step"] == 5
    for key in ("model", "optimizer", "generator", "torch_rng"):
        _assert_bitwise(a[key], b[key], key)
    assert (whole / "metrics.jsonl").read_text() == (part / "metrics.jsonl").read_text()


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    train(tiny("sinusoid", "fomaml", tmp_path, steps=3, checkpoint_every=2))
    state = _state(tmp_path)
    # A crash after step 3's metrics but before its checkpoint: only step 2's checkpoint.
    state["step"] = 2
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    train(TrainConfig(task="sinusoid", algo="fomaml", steps=4, out=str(tmp_path), resume=True,
                      progress=False, log_every=1))
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class Crash(BaseException):
    """Stands for a kill or Ctrl-C in the middle of writing."""


@pytest.mark.parametrize("interrupt", [Crash, KeyboardInterrupt])
def test_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch, interrupt):
    train(tiny("sinusoid", "maml", tmp_path, steps=2))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def crashing_save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.write(b"half a checkpoint")
        raise interrupt()

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(interrupt):
        train(TrainConfig(task="sinusoid", algo="maml", steps=4, out=str(tmp_path),
                          resume=True, checkpoint_every=1, progress=False))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert _state(tmp_path)["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    # ... and the run goes on from it.
    train(TrainConfig(task="sinusoid", algo="maml", steps=3, out=str(tmp_path), resume=True,
                      progress=False))
    assert _state(tmp_path)["step"] == 3


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    task_class = type(make_task("sinusoid"))
    real_sample = task_class.sample
    calls = []

    def poisoned(self, tasks, generator, split):
        batch = real_sample(self, tasks, generator, split)
        calls.append(split)
        if split == "train" and len(calls) == 4:
            batch["support_y"][0, 0] = float("inf")
        return batch

    monkeypatch.setattr(task_class, "sample", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 4\b.*step 2\b.*checkpoint\.pt"):
        train(tiny("sinusoid", "maml", tmp_path, steps=6, checkpoint_every=2))
    assert _state(tmp_path)["step"] == 2
    assert not (tmp_path / "summary.json").exists()


def cli(*args: str) -> int:
    return metakernels_main(["train", *args, "--no-progress"])


def test_cli_writes_a_run_and_refuses_to_overwrite_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["--task", "fewshot", "--algo", "fomaml", "--out", out, "--meta-batch", "2",
              "--inner-steps", "1", "--eval-tasks", "2"]
    assert cli("--steps", "2", *common) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert cli("--steps", "3", *common) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli("--steps", "3", *common, "--resume", "--seed", "5") == 2
    assert "seed=0" in capsys.readouterr().err
    assert cli("--steps", "3", *common, "--resume") == 0
    assert _state(pathlib.Path(out))["step"] == 3


@pytest.mark.parametrize("args, message", [
    (["--task", "sinusoid", "--algo", "anil", "--adapt", "all"], "anil adapts only the head"),
    (["--task", "sinusoid", "--trajectories", "2"], "--trajectories applies to another task"),
    (["--resume"], "no checkpoint.pt"),
    (["--meta-batch", "1", "--device", "nonsense"], "device"),
])
def test_cli_errors_name_the_problem(tmp_path, capsys, args, message):
    assert cli("--steps", "1", "--out", str(tmp_path / "x"), *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "2", "--algo", "sgd"],
                                  ["--steps", "2", "--inner-lr", "-1"], ["--task", "sinusoid"]])
def test_cli_rejects_bad_arguments(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        cli("--out", str(tmp_path), *args)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_ctrl_c_keeps_a_loadable_checkpoint(tmp_path):
    """A real SIGINT to `metakernels train` that saves every step: exit 130, a checkpoint that
    loads, no temporary file, and --resume goes on from it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "metakernels", "train", "--task", "sinusoid", "--steps",
               "1000000", "--out", str(tmp_path), "--checkpoint-every", "1", "--no-progress",
               "--meta-batch", "2", "--eval-tasks", "2"]
    # A shell without job control starts its background jobs with SIGINT ignored, and the
    # child inherits that (then Python installs no KeyboardInterrupt): give it the default.
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "is intact" in err
    step = _state(tmp_path)["step"]
    assert step >= 1 and not list(tmp_path.glob(".*.tmp"))
    train(TrainConfig(task="sinusoid", steps=step + 1, out=str(tmp_path), resume=True,
                      progress=False))
    assert _state(tmp_path)["step"] == step + 1


@pytest.mark.gpu
@pytest.mark.parametrize("task, algo, adapt", [("sinusoid", "maml", "head"),
                                               ("fewshot", "metasgd", "all"),
                                               ("reasoning", "fomaml", "head")])
def test_trains_on_cuda(tmp_path, task, algo, adapt):
    config = tiny(task, algo, tmp_path, adapt=adapt, device="cuda")
    train(config)
    summary = check_outputs(tmp_path, config, classification=task != "sinusoid")
    # The same run on the CPU lands close by (same tasks, same init; other kernels).
    cpu = train(tiny(task, algo, tmp_path / "cpu", adapt=adapt))
    assert summary["eval"]["query_loss_after_adapt"] == pytest.approx(
        cpu["eval"]["query_loss_after_adapt"], rel=1e-2)


@pytest.mark.parametrize("adapt,given,expected", [
    ("head", None, 0.1), ("all", None, 0.01), ("all-generic", None, 0.01), ("all", 0.05, 0.05)])
def test_sinusoid_inner_lr_default_follows_what_adapts(tmp_path, adapt, given, expected):
    """Finn et al.'s inner lr 0.01 when every layer adapts, the head's 0.1 otherwise; a given
    --inner-lr wins, and a resumed run keeps what it started with."""
    from metakernels.train.loop import resolve
    task = make_task("sinusoid")
    config = TrainConfig(task="sinusoid", algo="maml", adapt=adapt, steps=1, out=str(tmp_path),
                         inner_lr=given)
    assert resolve(config, task, None).inner_lr == expected
    saved = {"config": {**vars(resolve(config, task, None)), "inner_lr": 0.3}}
    assert resolve(config.replace(inner_lr=None), task, saved).inner_lr == 0.3
