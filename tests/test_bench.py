"""``metakernels bench`` end to end on tiny sizes, its peers, roofline model and GPU script."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import metakernels
from metakernels import cli
from metakernels.benchmarks import (CONFIGS, bench, get_contestant, make_problem, peers,
                                    roofline, suite, timing)
from metakernels.benchmarks.contestants import outer_loss
from metakernels.benchmarks.correctness import TOLERANCE, max_relative_error, reference_meta_grad

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(tasks=3, steps=2, support=5, d_in=7)


def tiny(name: str, **sizes):
    config = CONFIGS[name]
    cut = dict(tasks=3, steps=min(config.steps, 5), d_in=min(config.d_in, 9),
               d_out=config.d_out if config.loss == "ce" else 6)
    return dataclasses.replace(config, **{**cut, **sizes})


def test_bench_end_to_end_json_fields(monkeypatch, tmp_path, capsys):
    # Which contestant produced each meta-gradient, and which meta-gradients the suite compared
    # with the reference: every contestant that ran must have been compared.
    produced, compared = {}, []
    real_get, real_compare = suite.get_contestant, suite.max_relative_error

    def spying_get(name):
        meta_step = real_get(name)

        def wrapped(problem):
            out = meta_step(problem)
            produced[id(out)] = name
            return out
        return wrapped

    def spying_compare(outs, refs):
        compared.append(produced.get(id(outs)))
        return real_compare(outs, refs)

    monkeypatch.setattr(suite, "get_contestant", spying_get)
    monkeypatch.setattr(suite, "max_relative_error", spying_compare)
    monkeypatch.setitem(bench.QUICK_SIZES, "maml-ce", TINY)
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    code = cli.main(["bench", "--quick", "--config", "maml-ce", "--repeats", "3",
                     "--json", str(out_json), "--markdown", str(out_md)])
    printed = capsys.readouterr().out
    assert code == 0, printed

    records = json.loads(out_json.read_text())
    assert isinstance(records, list) and records
    for record in records:
        assert tuple(record) == bench.RECORD_FIELDS
        # The bare name a script selects by; the sizes run and the standard ones, fields of their
        # own.
        assert record["config"] == "maml-ce"
        assert {k: record[k] for k in ("tasks", "steps", "support", "d_in", "d_out")} == \
            dict(tasks=3, steps=2, support=5, d_in=7, d_out=5)
        assert record["scaled_from"] == dict(tasks=64, steps=5, support=25, d_in=64)
        assert record["sweep"] is None
        assert record["device"] == "cpu" and record["dtype"] == "float32"
        assert record["seconds_median"] > 0 and record["baseline_seconds_median"] > 0
        assert math.isclose(record["ratio"],
                            record["baseline_seconds_median"] / record["seconds_median"])
        assert 0 <= record["max_rel_error"] <= TOLERANCE[torch.float32]
        # --quick measures no memory: the fields are there, and null.
        assert record["peak_memory_bytes"] is None
        assert record["baseline_peak_memory_bytes"] is None

    ran = [f"metakernels:{b}" for b in metakernels.available_backends("cpu")]
    ran += ["torch.func", "autograd-loop"]
    ran += [name for name, peer in peers.PEERS.items()
            if peer.unavailable(CONFIGS["maml-ce"], "cpu", torch.float32) is None]
    assert set(compared) == set(ran), (compared, ran)
    # Each compiled backend against every other contestant; the reference as a baseline.
    compiled = [b for b in metakernels.available_backends("cpu") if b != "reference"]
    expected_pairs = {(b, bench.short_name(other)) for b in compiled for other in ran
                      if other != f"metakernels:{b}"}
    if not compiled:
        expected_pairs = {("reference", other) for other in ran if other != "metakernels:reference"}
    assert {(r["backend"], r["baseline"]) for r in records} == expected_pairs
    assert "learn2learn" in printed  # present, or skipped with its reason
    report = out_md.read_text()
    assert "| maml-ce | B=3 T=2 n=5 7x5 | B=64 T=5 n=25 d_in=64 | float32 | " in report
    assert "| config | sizes | scaled from | dtype | contestant |" in report
    assert "torch.func" in report
    assert "python -m metakernels bench --quick --config maml-ce" in report


def test_bench_peak_memory_fields(monkeypatch, tmp_path, capsys):
    # One child process per contestant; the peers are left out to keep this short.
    monkeypatch.setattr(peers, "PEERS", {})
    monkeypatch.setattr(bench, "PEERS", {})
    # Big enough that torch.func's stored steps (4 × 8 tasks × 64 × 128 float32, 1 MiB) show.
    monkeypatch.setitem(bench.QUICK_SIZES, "trajectory", dict(tasks=8, steps=4, d_in=64))
    out_json = tmp_path / "out.json"
    code = cli.main(["bench", "--quick", "--config", "trajectory", "--backend", "reference",
                     "--repeats", "2", "--memory", "--json", str(out_json)])
    assert code == 0, capsys.readouterr().out
    records = json.loads(out_json.read_text())
    assert {r["baseline"] for r in records} == {"torch.func", "autograd-loop"}
    for record in records:
        assert isinstance(record["peak_memory_bytes"], int)
        assert isinstance(record["baseline_peak_memory_bytes"], int)
    by_baseline = {r["baseline"]: r["baseline_peak_memory_bytes"] for r in records}
    assert by_baseline["torch.func"] >= 2**19


def test_bench_leaves_out_a_disagreeing_peer(monkeypatch, tmp_path, capsys):
    right = peers.PEERS["torchopt"].meta_step

    def wrong(problem):
        return {name: 1.01 * grad for name, grad in right(problem).items()}

    monkeypatch.setitem(peers.PEERS, "torchopt",
                        dataclasses.replace(peers.PEERS["torchopt"], meta_step=wrong))
    monkeypatch.setitem(bench.QUICK_SIZES, "maml-small", TINY)
    out_json = tmp_path / "out.json"
    code = cli.main(["bench", "--quick", "--config", "maml-small", "--repeats", "2",
                     "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "torchopt                left out: meta-gradient differs from the reference" in printed
    baselines = {r["baseline"] for r in json.loads(out_json.read_text())}
    assert "torchopt" not in baselines and "torch.func" in baselines


def test_bench_sweep_plots_and_slopes(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # --plot needs the bench extra (test_extras: its refusal)
    monkeypatch.setitem(bench.QUICK_SIZES, "maml-small", TINY)
    monkeypatch.setitem(bench.QUICK_SWEEP_VALUES, "T", (2, 4, 8))
    code = cli.main(["bench", "--quick", "--config", "maml-small", "--sweep", "T",
                     "--backend", "reference", "--repeats", "2", "--plot", str(tmp_path),
                     "--markdown", str(tmp_path / "report.md")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    png = tmp_path / "sweep-T.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "![sweep-T](sweep-T.png)" in report
    assert "| maml-small | B=3 T=8 n=5 7x64, sweep T | B=64 T=5 n=16 d_in=64 | float32 |" in report
    # A fitted time slope for every contestant that ran (a number: timings are noisy, so no
    # claim about its size here; test_slope_of_a_power_law checks the fit).
    for name in ("reference", "torch.func", "autograd-loop"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert math.isfinite(float(row.split("|")[2])), row


def test_slope_of_a_power_law():
    from metakernels.benchmarks import plots
    assert plots.slope([2, 4, 8, 16], [3 * x**1.5 for x in (2, 4, 8, 16)]) == pytest.approx(1.5)
    assert math.isnan(plots.slope([4, 4], [1.0, 2.0]))


def test_bench_refuses_half_precision_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setitem(bench.QUICK_SIZES, "maml-small", TINY)
    code = cli.main(["bench", "--quick", "--config", "maml-small:bfloat16"])
    assert code == 0
    assert "skipped: metakernels runs float32 and float64 on the CPU" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["nope", "maml-small:int8"])
def test_bench_rejects_unknown_config(text, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--config", text])
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_module_peers_agree_with_the_reference(name):
    problem = make_problem(tiny(name), torch.float64, "cpu", seed=2)
    reference = reference_meta_grad(problem)
    for peer in ("higher", "torchopt"):
        if peers.PEERS[peer].unavailable(problem.config, "cpu", torch.float64):
            continue
        error = max_relative_error(get_contestant(peer)(problem), reference)
        assert error <= TOLERANCE[torch.float64], (peer, error)


def test_fla_mapping_is_the_delta_rule():
    # flash-linear-attention's reference recurrence, behind chunk_delta_rule's signature: the
    # mapping W = Sᵀ, β = η, k = x, v = y, q = query, scale 1 must give the reference's
    # meta-gradient (float32 state in fla, hence the float32 tolerance).
    naive = pytest.importorskip("fla.ops.delta_rule.naive")

    def chunk_like(q, k, v, beta, scale, initial_state, output_final_state):
        d_k = q.shape[-1]
        o, state = naive.delta_rule_recurrence(
            *(t.transpose(1, 2) for t in (q * scale * d_k**0.5, k, v)), beta.transpose(1, 2),
            initial_state, output_final_state)
        return o.transpose(1, 2), state

    config = tiny("delta-rule", steps=9)
    assert peers.delta_rule_form(config) is None
    problem = make_problem(config, torch.float64, "cpu", seed=3)
    readout = peers.delta_rule_readout(problem, chunk_like)
    meta_loss = outer_loss(problem.batch, {}, readout, "mse")
    grads = dict(zip(problem.params, torch.autograd.grad(meta_loss, (problem.params["weight"],))))
    assert max_relative_error(grads, reference_meta_grad(problem)) <= TOLERANCE[torch.float32]
    assert "n = 1" in peers.delta_rule_form(CONFIGS["trajectory"])
    assert peers.PEERS["fla:chunk_delta_rule"].unavailable(config, "cpu",
                                                          torch.bfloat16) == "runs on cuda only"


def test_roofline_work_model():
    # maml-small by hand: B=64, T=5, n=16, d=e=64, no readout, float32.
    work = roofline.work(CONFIGS["maml-small"], torch.float32)
    gemm = 2 * 16 * 64 * 64
    assert work.flops == 64 * (5 * 4 * gemm + 2 * gemm)
    assert work.recompute_flops == 64 * 5 * 2 * gemm
    inputs = 4 * (64 * 16 * 64 * 2 + 64 * 16 * 64 * 2)     # support x, y; query x, y
    outputs = 4 * 2 * 64 * 64 * 64                          # W_T and its adjoint
    assert work.io_bytes == inputs + outputs + 4 * 2 * 64 * 64 + 5 * 4
    assert work.state_bytes == 2 * 64 * 5 * 64 * 64 * 4
    # Twice the tasks: twice the work.
    double = roofline.work(dataclasses.replace(CONFIGS["maml-small"], tasks=128), torch.float32)
    assert double.flops == 2 * work.flops and double.state_bytes == 2 * work.state_bytes
    # The floor is the better strategy: memory-bound storing loses to recomputing when
    # bandwidth is scarce, and the floor never exceeds either.
    rate, slow_bw = 1e12, 1e6
    floor = work.floor_seconds(rate, slow_bw)
    assert floor == pytest.approx(max((work.flops + work.recompute_flops) / rate,
                                      work.io_bytes / slow_bw))
    # ce labels are int64 and a readout replaces the query set.
    ce = roofline.work(CONFIGS["maml-ce"], torch.float32)
    assert ce.io_bytes < roofline.work(dataclasses.replace(CONFIGS["maml-ce"], d_out=64,
                                                           loss="mse"), torch.float32).io_bytes


def test_ceilings_measured_on_the_cpu():
    ceilings = roofline.measure_ceilings("cpu", matmul_size=128, copy_bytes=2**20, repeats=2)
    assert set(ceilings.matmul_flops_per_s) == {"float32", "float64"}
    assert all(rate > 0 for rate in ceilings.matmul_flops_per_s.values())
    assert ceilings.copy_bytes_per_s > 0
    assert ceilings.matmul_rate(torch.float32, tf32=True) == ceilings.matmul_flops_per_s["float32"]
    work = roofline.work(CONFIGS["maml-small"], torch.float32)
    floor = work.floor_seconds(ceilings.matmul_flops_per_s["float32"], ceilings.copy_bytes_per_s)
    fraction = roofline.achieved_fraction(CONFIGS["maml-small"], torch.float32, 4 * floor,
                                          ceilings)
    assert fraction == pytest.approx(0.25)


def test_timing_per_name_repeats():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("fast", "slow")}
    samples = timing.time_interleaved(runs, repeats={"fast": 3, "slow": 1},
                                      warmup={"fast": 1, "slow": 0})
    assert {name: len(s) for name, s in samples.items()} == {"fast": 3, "slow": 1}
    assert calls == ["fast", "fast", "slow", "fast", "fast"]


def test_timing_takes_the_given_clock():
    """Each sample is the clock's advance over one call (e.g. time.thread_time, CPU time)."""
    advances = {"a": 5, "b": 2}
    now = [0.0]

    def clock():
        return now[0]

    def run(name):
        now[0] += advances[name]
    runs = {name: (lambda name=name: run(name)) for name in advances}
    samples = timing.time_interleaved(runs, repeats=3, warmup=1, clock=clock)
    assert samples == {"a": [5, 5, 5], "b": [2, 2, 2]}


def test_gpu_check_script_parses():
    script = ROOT / "bench" / "gpu" / "check.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Its benchmark command is one the command line accepts, at full size on the GPU.
    text = script.read_text().replace("\\\n", " ")
    command = re.search(r'-m metakernels (bench [^\n]*)', text).group(1)
    argv = shlex.split(command.replace('"$OUT', '"/tmp'))
    args = cli._parser().parse_args(argv)
    assert args.device == "cuda"
    assert {name for name, _ in args.config} == set(CONFIGS)
    assert ("delta-rule", "bfloat16") in args.config


def test_a_case_that_fails_does_not_stop_the_run(monkeypatch, capsys):
    real = bench.run_case

    def run_case(case, *args, **kwargs):
        if case.config.name == "maml-small":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(bench, "run_case", run_case)
    monkeypatch.setitem(bench.QUICK_SIZES, "maml-small", TINY)
    monkeypatch.setitem(bench.QUICK_SIZES, "maml-ce", TINY)
    code = cli.main(["bench", "--quick", "--config", "maml-small", "--config", "maml-ce",
                     "--backend", "reference", "--repeats", "2"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "case failed: OutOfMemoryError: CUDA out of memory (simulated)" in printed
    assert "== maml-ce" in printed and "1 case(s) failed to run (maml-small (scaled:" in printed
