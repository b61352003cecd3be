"""``torchrun --nproc_per_node=2 -m metakernels.train``: two CPU ranks (gloo) share the task
batch and end with the parameters of one process that trains on the whole batch."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

from metakernels.train import TrainConfig, checkpoint, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("task, algo", [("sinusoid", "maml"), ("fewshot", "reptile")])
def test_two_ranks_match_one_process(tmp_path, task, algo):
    settings = dict(task=task, algo=algo, steps=3, meta_batch=6, inner_steps=2, eval_tasks=4,
                    seed=3)
    single = tmp_path / "single"
    train(TrainConfig(out=str(single), progress=False, log_every=1, **settings))

    ranks = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               "-m", "metakernels.train", "--out", str(ranks), "--no-progress",
               "--log-every", "1"]
    for name, value in settings.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    want, got = checkpoint.load(single / "checkpoint.pt"), checkpoint.load(ranks / "checkpoint.pt")
    assert got["step"] == 3
    for name, value in want["model"].items():
        assert torch.allclose(got["model"][name], value, rtol=1e-4, atol=1e-6), name
    # Not bitwise: the ranks sum their halves of the meta-gradient in another order. Adam's
    # moments also catch a meta-gradient counted twice (Adam's steps would not).
    for state_want, state_got in zip(want["optimizer"]["state"].values(),
                                     got["optimizer"]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state_got[key], state_want[key], rtol=1e-3, atol=1e-9)
    # Rank 0 alone writes: one metrics line per step, one summary.
    records = [json.loads(line) for line in (ranks / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    single_records = [json.loads(line) for line in
                      (single / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records, single_records):
        assert a["outer_loss"] == pytest.approx(b["outer_loss"], rel=1e-5)
    assert json.loads((ranks / "summary.json").read_text())["steps"] == 3
    assert result.stdout.count('"seconds_per_step"') == 1
