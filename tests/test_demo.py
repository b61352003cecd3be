"""``metakernels demo`` and the benchmark harness behind it (metakernels/benchmarks)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metakernels
from metakernels import cli
from metakernels.benchmarks import CONFIGS, contestant_names, get_contestant, make_problem
from metakernels.benchmarks import memory, suite, timing
from metakernels.benchmarks.contestants import outer_loss
from metakernels.benchmarks.correctness import (TOLERANCE, check_backends, max_relative_error,
                                                reference_meta_grad)

ROOT = Path(__file__).resolve().parents[1]


def small(name: str, **sizes):
    """A standard configuration (docs/conventions.md) with its options kept and its sizes cut, odd
    where the row allows, so every contestant runs in milliseconds."""
    config = CONFIGS[name]
    cut = dict(tasks=3, steps=min(config.steps, 6), d_in=min(config.d_in, 13),
               d_out=config.d_out if config.loss == "ce" else 11)
    return dataclasses.replace(config, **{**cut, **sizes})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_contestant_agrees_with_the_reference(name, dtype):
    # torch.func and autograd-loop derive the inner gradient with autograd, not the closed form
    # of the reference, so this compares independent implementations.
    problem = make_problem(small(name), dtype, "cpu", seed=1)
    reference = reference_meta_grad(problem)
    assert reference.keys() == problem.params.keys()
    for contestant in contestant_names("cpu"):
        meta_grad = get_contestant(contestant)(problem)
        assert meta_grad.keys() == reference.keys(), contestant
        for param, grad in meta_grad.items():
            assert grad.shape == problem.params[param].shape, (contestant, param)
            assert grad.dtype == dtype, (contestant, param)
        error = max_relative_error(meta_grad, reference)
        assert error <= TOLERANCE[dtype], f"{contestant}: {error:.2e}"


@pytest.mark.parametrize("name", ["maml-small", "maml-ce"])
def test_first_order_meta_grad_fails_the_check(name):
    # The agreement check means something only if the second-order terms are far above its
    # tolerance on these problems: FOMAML, which drops them, must fail it.
    problem = make_problem(small(name), torch.float64, "cpu", seed=1)
    params, batch = problem.params, problem.batch
    out = metakernels.fast_weight_unroll(
        params["weight"], batch["support_x"], batch["support_y"], problem.inner_lr,
        steps=problem.steps, loss=problem.config.loss, bias=params.get("bias"), first_order=True)
    fast = {"weight": out.weight, **({"bias": out.bias} if out.bias is not None else {})}
    first_order = dict(zip(params, torch.autograd.grad(
        outer_loss(batch, fast, None, problem.config.loss), tuple(params.values()))))
    assert max_relative_error(first_order, reference_meta_grad(problem)) > 100 * TOLERANCE[
        torch.float32]


def test_make_problem_shapes():
    for name, config in CONFIGS.items():
        config = small(name)
        problem = make_problem(config, torch.float32, "cpu", seed=0)
        b, t, n, m = config.tasks, config.steps, config.support, config.queries
        weight = problem.params["weight"]
        assert weight.requires_grad and weight.is_leaf
        assert weight.shape == ((config.d_in, config.d_out) if config.shared_init
                                else (b, config.d_in, config.d_out))
        assert ("bias" in problem.params) == config.bias
        x_shape = (b, t, n, config.d_in) if config.x_per_step else (b, n, config.d_in)
        assert problem.batch["support_x"].shape == x_shape
        if m:
            assert problem.batch["readout_queries"].shape == (b, t, m, config.d_in)
        else:
            assert problem.batch["query_x"].shape == (b, n, config.d_in)
        if config.lr_per_step:
            assert problem.inner_lr.shape == (t,)
        else:
            assert problem.inner_lr == 0.1
    # The same seed is the same problem in every dtype.
    first = make_problem(CONFIGS["maml-ce"], torch.float32, seed=3)
    again = make_problem(CONFIGS["maml-ce"], torch.float64, seed=3)
    assert torch.equal(first.batch["support_y"], again.batch["support_y"])
    torch.testing.assert_close(first.params["weight"].double(), again.params["weight"],
                               rtol=1e-6, atol=1e-7)


def test_backend_check_passes():
    checks = check_backends("cpu", torch.float64)
    expected = [b for b in metakernels.available_backends("cpu") if b != "reference"]
    assert {c.backend for c in checks} == set(expected)
    assert {(c.loss, c.case) for c in checks} >= {("mse", "maml"), ("ce", "trajectory")}
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_timing_interleaves_and_rotates():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = timing.time_interleaved(runs, repeats=3, warmup=1)
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_a_disagreeing_contestant_is_left_out(monkeypatch):
    def wrong(problem):
        return {name: 2 * grad for name, grad in get_contestant("autograd-loop")(problem).items()}

    monkeypatch.setattr(suite, "get_contestant",
                        lambda name: wrong if name == "autograd-loop" else get_contestant(name))
    records = suite.run_config(small("maml-small"), repeats=2, warmup=0, measure_memory=False,
                               log=lambda line: None)
    by_name = {r.contestant: r for r in records}
    assert not by_name["autograd-loop"].agrees
    assert "differs from the reference" in by_name["autograd-loop"].reason
    assert by_name["autograd-loop"].median_ms is None
    assert all(r.agrees and r.median_ms > 0 for n, r in by_name.items() if n != "autograd-loop")
    table = suite.format_table(records)
    assert "autograd-loop           left out: meta-gradient differs" in table


def test_peak_memory_in_a_child_process():
    # A parent that has already run something large: its peak must not leak into the child's.
    peak = memory.measure_in_child(small("maml-small", tasks=64, d_in=64, d_out=64),
                                   "metakernels:reference")
    assert peak.error == ""
    assert peak.method in (memory.RESET_METHOD, memory.NO_RESET_METHOD)
    # The reference keeps every step's activations: at least W_t for each of the 6 steps,
    # 64 tasks × 64 × 64 float32, and far below the size of the process.
    if peak.method == memory.RESET_METHOD:
        assert 6 * 64 * 64 * 64 * 4 <= peak.peak_bytes < 200 * 2**20


def test_demo_quick(capsys, tmp_path):
    records_path = tmp_path / "demo.json"
    code = cli.main(["demo", "--quick", "--repeats", "2", "--no-memory",
                     "--json", str(records_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    backends = [b for b in metakernels.available_backends("cpu") if b != "reference"]
    for backend in backends:
        for loss in ("mse", "ce"):
            assert any(line.split()[:2] == [backend, loss] and line.endswith("PASS")
                       for line in out.splitlines()), out
    assert "FAIL" not in out.replace("FAIL:", "")
    for config in ("maml-small", "maml-ce"):
        assert f"== {config}:" in out
    table_rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    for contestant in contestant_names("cpu"):
        rows = [row for row in table_rows if row[0] == contestant and len(row) == 6]
        assert len(rows) == 2, (contestant, out)
        assert all(float(row[5]) <= TOLERANCE[torch.float32] for row in rows)
    assert "ratio = median / median of metakernels:" in out
    assert "reproduce: " in out and "-m metakernels demo --quick" in out
    saved = json.loads(records_path.read_text())
    assert len(saved["results"]) == 2 * len(contestant_names("cpu"))
    assert all(r["agrees"] and r["median_ms"] > 0 for r in saved["results"])
    # config is the bare name; --quick's cut is in fields of their own.
    for record in saved["results"]:
        assert record["config"] in ("maml-small", "maml-ce")
        assert (record["tasks"], record["scaled_from"]) == (8, {"tasks": 64})
        assert record["steps"] == 5 and record["d_in"] == 64


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run([sys.executable, "-m", "metakernels", "demo", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--repeats" in done.stdout
