"""The ``walk`` task: the groups, the walk, its closed-form reference H_k (against Monte Carlo),
corrupted walks, groupings, the causal LM's training data, trainer conventions and measurements,
the fast-weight memory's task, and a smoke run of ``bench/experiments/raml.py``."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from metakernels.train import TrainConfig, train
from metakernels.train.loop import resolve
from metakernels.train.tasks import make_task
from metakernels.train.tasks import walk_data as wd



@pytest.mark.parametrize("name, order", [("S3", 6), ("A5", 60)])
def test_groups_are_groups_and_u_is_a_third_that_is_no_coset(name, order):
    g = wd.group(name)
    assert g.order == order and g.table.shape == (order, order)
    table = g.table
    e = torch.arange(order)
    assert torch.equal(table[0], e) and torch.equal(table[:, 0], e)          # identity
    assert bool((table == 0).any(1).all())                                    # inverses
    for row in table:                                                         # Latin square
        assert torch.equal(row.sort().values, e)
    a, b, c = torch.randint(0, order, (3, 500), generator=torch.Generator().manual_seed(0))
    assert torch.equal(table[table[a, b], c], table[a, table[b, c]])          # associative
    assert not torch.equal(table, table.T)                                    # non-abelian
    # composition as permutations: (a · b)(i) = a(b(i))
    for i, j in [(1, 2), (order - 1, 3)]:
        p, q = g.elements[i], g.elements[j]
        assert g.elements[int(table[i, j])] == tuple(p[q[x]] for x in range(len(p)))
    assert int(g.upper.sum()) == order // 3
    # U is no coset gH: g⁻¹U is not closed under the group law
    for member in g.upper.nonzero()[:, 0].tolist():
        inverse = int((table[member] == 0).nonzero()[0, 0])
        shifted = table[inverse, g.upper.nonzero()[:, 0]]
        products = table[shifted][:, shifted].reshape(-1)
        assert not bool(torch.isin(products, shifted).all())


def test_walk_follows_the_rule_step_by_step():
    g = wd.group("A5")
    batch = wd.sample_questions(7, 9, group_name="A5", generator=torch.Generator().manual_seed(3))
    for b in range(7):
        q, r = (0, 1, 2, 3, 4), 0
        for k in range(9):
            c = g.elements[int(batch.symbols[b, k])]
            q = tuple(q[c[i]] for i in range(5))
            r += 1 if bool(g.upper[g.elements.index(q)]) else -1
            assert g.elements[int(batch.states[b, k])] == q
            assert int(batch.positions[b, k]) == r
    assert torch.equal(batch.answer, batch.positions[:, -1])


def test_no_lookahead_entropy_is_exact():
    h = wd.no_lookahead_entropy(12)
    assert len(h) == 13 and h[-1] == 0.0
    assert h[-2] == pytest.approx(math.log(3) - 2 / 3 * math.log(2), abs=1e-12)
    assert h[0] == pytest.approx(1.904, abs=1e-3) and h[-2] == pytest.approx(0.637, abs=1e-3)
    assert all(a > b for a, b in zip(h, h[1:]))
    # against the binomial's pmf summed another way (the law of r_S − r_k by convolution)
    pmf = torch.tensor([1.0], dtype=torch.float64)
    for n in range(13):
        want = -(pmf * pmf.log()).sum().item()
        assert wd.no_lookahead_entropy(12)[12 - n] == pytest.approx(want, abs=1e-12)
        pmf = torch.cat([pmf * 2 / 3, pmf.new_zeros(1)]) + torch.cat([pmf.new_zeros(1), pmf / 3])


@pytest.mark.parametrize("name", ["S3", "A5"])
def test_no_lookahead_entropy_matches_monte_carlo_walks(name):
    """H_k against the plug-in entropy of r_S − r_k over simulated walks (the group's own rule,
    not a binomial sampler): the steps really are independent with P(up) = 1/3."""
    length, samples = 8, 200_000
    batch = wd.sample_questions(samples, length, group_name=name,
                                generator=torch.Generator().manual_seed(11))
    positions = torch.cat([torch.zeros(samples, 1, dtype=torch.int64), batch.positions], 1)
    exact = wd.no_lookahead_entropy(length)
    for k in range(length + 1):
        rest = positions[:, -1] - positions[:, k]
        p = torch.bincount(rest + length).double() / samples
        p = p[p > 0]
        estimate = -(p * p.log()).sum().item()
        # plug-in bias ≈ (support − 1) / (2N) ≈ 2·10⁻⁵; sampling noise ≈ 3·10⁻³
        assert estimate == pytest.approx(exact[k], abs=0.01), k
    up = (batch.positions.diff(dim=1, prepend=torch.zeros(samples, 1, dtype=torch.int64)) > 0)
    assert up.double().mean().item() == pytest.approx(1 / 3, abs=0.005)


def test_corrupt_makes_one_state_wrong_and_continues_the_walk():
    g = wd.group("S3")
    batch = wd.sample_questions(50, 10, generator=torch.Generator().manual_seed(4))
    wrong, step = wd.corrupt(batch, "S3", generator=torch.Generator().manual_seed(5))
    assert torch.equal(wrong.symbols, batch.symbols)
    assert set(step.tolist()) <= set(range(1, 11)) and len(set(step.tolist())) > 3
    for b in range(50):
        j = int(step[b]) - 1
        assert torch.equal(wrong.states[b, :j], batch.states[b, :j])
        assert torch.equal(wrong.positions[b, :j], batch.positions[b, :j])
        assert bool(g.upper[wrong.states[b, j]]) != bool(g.upper[batch.states[b, j]])
        assert int(wrong.positions[b, j] - batch.positions[b, j]) in (-2, 2)
        for k in range(j + 1, 10):
            q = int(g.table[wrong.states[b, k - 1], batch.symbols[b, k]])
            assert int(wrong.states[b, k]) == q
            move = 1 if bool(g.upper[q]) else -1
            assert int(wrong.positions[b, k]) == int(wrong.positions[b, k - 1]) + move
    with pytest.raises(ValueError, match="step"):
        wd.corrupt(batch, "S3", generator=torch.Generator(), step=torch.tensor(0))


def test_groupings_are_distinct_valid_and_counted():
    found = wd.sample_groupings(6, 13, generator=torch.Generator().manual_seed(0))
    assert found[0] == (1, 2, 3, 4, 5, 6) and len(set(found)) == 13   # Fibonacci(7) = 13: all
    for steps in found:
        assert steps[-1] == 6
        assert all(b - a in (1, 2) for a, b in zip((0,) + steps, steps))
    with pytest.raises(ValueError, match="only 13"):
        wd.sample_groupings(6, 14, generator=torch.Generator())
    with pytest.raises(ValueError, match="group"):
        wd.group("S4")


def test_training_batch_layout_and_scored_tokens():
    from metakernels.train import walk_lm as lm
    vocab = wd.Vocabulary("S3", 5)
    batch = wd.sample_questions(3, 5, generator=torch.Generator().manual_seed(0))
    groupings = [(1, 2, 3, 4, 5), (2, 4, 5), (1, 3, 5)]
    ids, scored = lm.training_batch(vocab, batch, groupings, trajectory=True,
                                    early=torch.tensor([False, False, True]),
                                    cuts=torch.tensor([0, 0, 2]))
    entries = wd.entry_ids(vocab, batch)
    prompt = wd.prompt_ids(vocab, batch)
    answer = wd.answer_token(vocab, batch.answer)
    want = [torch.cat([prompt[0], entries[0].reshape(-1)]),
            torch.cat([prompt[1], entries[1, [1, 3, 4]].reshape(-1)]),
            torch.cat([prompt[2], entries[2, [0, 2]].reshape(-1)])]
    for i, w in enumerate(want):
        row = torch.cat([w, torch.tensor([wd.ANSWER, int(answer[i]), wd.EOS])])
        assert torch.equal(ids[i, :row.numel()], row)
        assert bool((ids[i, row.numel():] == wd.PAD).all())
        n = prompt.shape[1]
        assert not bool(scored[i, :n].any())
        # whole sequences: trajectory, A:, answer, eos; early exit: answer and eos only
        expect = [True] * (row.numel() - n) if i < 2 else [False] * (row.numel() - n - 2) + [
            True, True]
        assert scored[i, n:row.numel()].tolist() == expect
        assert not bool(scored[i, row.numel():].any())
    ids, scored = lm.training_batch(vocab, batch, groupings, trajectory=False,
                                    early=torch.zeros(3, dtype=torch.bool),
                                    cuts=torch.zeros(3, dtype=torch.long))
    assert ids.shape[1] == prompt.shape[1] + 3 and bool(scored[:, -3:].all())


def _tiny_lm(out, **changes):
    from metakernels.train import walk_lm as lm
    settings = dict(out=str(out), steps=4, length=4, width=16, layers=1, heads=2, batch=6,
                    progress=False, log_every=1, checkpoint_every=2)
    settings.update(changes)
    return lm.WalkLMConfig(**settings)


def test_lm_resume_is_bitwise_and_checks_settings(tmp_path):
    pytest.importorskip("transformers")
    from metakernels.train import checkpoint
    from metakernels.train import walk_lm as lm
    lm.train_lm(_tiny_lm(tmp_path / "whole", questions=10, trajectories=3))
    lm.train_lm(_tiny_lm(tmp_path / "half", steps=2, questions=10, trajectories=3))
    lm.train_lm(_tiny_lm(tmp_path / "half", questions=10, trajectories=3, resume=True))
    whole = checkpoint.load(tmp_path / "whole" / lm.CHECKPOINT)["model"]
    half = checkpoint.load(tmp_path / "half" / lm.CHECKPOINT)["model"]
    assert all(torch.equal(whole[k], half[k]) for k in whole)
    lines = [json.loads(x) for x in (tmp_path / "half" / lm.METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in lines)
    with pytest.raises(ValueError, match="already holds a run"):
        lm.train_lm(_tiny_lm(tmp_path / "half"))
    with pytest.raises(ValueError, match="width"):
        lm.train_lm(_tiny_lm(tmp_path / "half", width=32, resume=True, questions=10,
                             trajectories=3))
    with pytest.raises(ValueError, match="trajectories > 1 needs"):
        lm.train_lm(_tiny_lm(tmp_path / "new", trajectories=2))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_measurements_agree_with_plain_forwards(tmp_path, arch):
    """answer_loss_curves (one batched pass per question) against the loop of plain forwards,
    and final_answer against the curve's last point."""
    pytest.importorskip("transformers")
    from metakernels.analysis import answer_loss_curve_loop
    from metakernels.train import walk_lm as lm
    lm.train_lm(_tiny_lm(tmp_path, arch=arch, steps=2))
    model, vocab, config = lm.load_lm(tmp_path)
    batch = lm.held_out(config, 3, 7)
    wrong, _ = wd.corrupt(batch, "S3", generator=torch.Generator().manual_seed(1))
    curves = lm.answer_loss_curves(model, vocab, batch, wrong)
    prompts, entries = wd.prompt_ids(vocab, batch), wd.entry_ids(vocab, wrong)
    for i in range(3):
        with torch.no_grad():
            want = answer_loss_curve_loop(
                model, prompts[i], entries[i].reshape(-1),
                wd.answer_token(vocab, batch.answer[i:i + 1]), list(range(0, 17, 4)),
                answer_prefix_ids=torch.tensor([wd.ANSWER]))
        assert torch.allclose(curves[i], want, atol=1e-5)
    loss, _ = lm.final_answer(model, vocab, batch, trajectory=True)
    assert torch.allclose(loss, lm.answer_loss_curves(model, vocab, batch)[:, -1], atol=1e-5)
    answers = lm.generate_answers(model, vocab, batch, samples=3, sample=True)
    assert answers.shape == (3, 3)


def test_pass_curves_average_the_estimators():
    from metakernels.analysis import mg_pass_at_k, pass_at_k
    from metakernels.train import walk_lm as lm
    hits = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    passes, mg = lm.pass_curves(hits, [1, 2])
    assert passes["2"] == pytest.approx((pass_at_k(4, 2, 2) + 0 + pass_at_k(4, 3, 2)) / 3)
    assert mg["2"] == pytest.approx((mg_pass_at_k(4, 2, 2) + mg_pass_at_k(4, 3, 2)) / 3)


def test_fast_weight_memory_task_reads_one_entry_per_inner_step():
    pytest.importorskip("transformers")
    task = make_task("walk")
    config = resolve(TrainConfig(task="walk", algo="maml"), task, None)
    assert config.answer_every_step and config.trajectory_length == 12
    task.configure(config.replace(trajectory_length=5))
    torch.manual_seed(0)
    model = task.build_model(config.replace(trajectory_length=5))
    batch = task.sample(4, torch.Generator().manual_seed(0), "train")
    assert batch["trajectory_ids"].shape == (4, 1, 5, 4)
    assert bool((batch["answer"] >= 0).all() and (batch["answer"] <= 10).all())
    adapted = model.inner_loop(batch)
    assert adapted.pred.shape == (4, 6, 11)            # after 0, 1, …, 5 entries
    assert adapted.inner_losses.shape == (4, 5)        # one inner step per entry
    model.eval()
    with torch.no_grad():
        curve = model.answer_loss_by_prefix(batch)
        final = model.query_losses(model.inner_loop(batch).pred, batch)[0]
    loss = torch.nn.functional.cross_entropy(adapted.pred.transpose(1, 2),
                                             batch["answer"][:, None].expand(-1, 6),
                                             reduction="none")
    assert torch.allclose(curve, loss, atol=1e-5) and torch.allclose(curve[:, -1], final)
    correct, wrong = task.sample_with_corruption(3, torch.Generator().manual_seed(1))
    assert torch.equal(correct["answer"], wrong["answer"])
    assert not torch.equal(correct["trajectory_ids"], wrong["trajectory_ids"])
    with pytest.raises(ValueError, match="--trajectories 1"):
        make_task("walk").configure(config.replace(trajectories=2))


def test_raml_smoke(tmp_path):
    """The whole pipeline of bench/experiments/raml.py at tiny sizes: every field of raml.json
    and every plot (the numbers mean nothing at this size)."""
    pytest.importorskip("transformers")
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "experiments" / "raml.py"
    spec = importlib.util.spec_from_file_location("raml", path)
    raml = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(raml)
    assert raml.main(["--out", str(tmp_path), "--smoke", "--jobs", "1"]) == 0
    result = json.loads((tmp_path / "raml.json").read_text())
    assert result["task"] == {"name": "walk", "length": 4, "group": "S3",
                              "fast_weight_memory_group": "S3"}
    assert result["no_lookahead"] == pytest.approx(wd.no_lookahead_entropy(4))
    lm = result["causal_lm"]
    for curve in (lm["trajectory"]["answer_loss"], lm["trajectory"]["answer_loss_corrupted"],
                  result["fast_weight_memory"]["trajectory"]["answer_loss"]):
        assert len(curve) == 5 and all(math.isfinite(v) and v >= 0 for v in curve)
    for name in ("pass_at_k", "mg_pass_at_k"):
        assert set(lm["trajectory"][name]) == {"1", "2"}
        assert all(0 <= v <= 1 for v in lm["trajectory"][name].values())
    assert lm["trajectory"]["pass_at_k"]["2"] >= lm["trajectory"]["pass_at_k"]["1"]
    assert 0 <= lm["no_trajectory"]["accuracy"] <= 1
    assert math.isfinite(lm["no_trajectory"]["answer_loss"])
    assert 0 <= result["fast_weight_memory"]["trajectory"]["accuracy"] <= 1
    assert [row["K"] for row in result["trajectories_per_question"]] == [1, 2]
    assert "| H_k (reference) |" in (tmp_path / "tables.md").read_text()
    for png in ("answer_loss.png", "k_sweep.png", "pass_at_k.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(itertools.chain(result["criteria"])) >= {"lm_ends_at_most_0.1",
                                                        "fwm_ends_at_most_0.2"}


def test_read_every_chunk_equals_reading_each_prefix():
    """The memory's readout after every chunk (one fused call) against one unroll per prefix."""
    from metakernels.nn import FastWeightMemory
    torch.manual_seed(0)
    memory = FastWeightMemory(8, 5, 3, chunk_size=2, bias=True).double()
    hidden, query = torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(3, 2, 8,
                                                                          dtype=torch.float64)
    read = memory.read_every_chunk(hidden, query)
    assert read.shape == (3, 4, 2, 3)
    q = torch.nn.functional.normalize(memory.to_query(query), dim=-1)
    for t in range(4):
        _, state = memory(hidden[:, :2 * (t + 1)], return_state=True)
        want = q @ state.weight + state.bias[:, None]
        assert torch.allclose(read[:, t], want, atol=1e-10), t
    with pytest.raises(ValueError, match="query"):
        memory.read_every_chunk(hidden, query[0])
