"""The reasoning task's questions: determinism, correct trajectories in every written form,
corrupted trajectories wrong from the corrupted step on, the vocabulary round trip, shapes."""

from __future__ import annotations

import pytest
import torch

from metakernels.train.tasks import reasoning_data as rd


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def eval_step(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op] % 10


def parse_text(batch, i, k):
    """The trajectory k of question i read back from its text."""
    words = rd.decode(batch.trajectory_ids[i, k]).split()
    return [words[j:j + 6] for j in range(0, len(words), 6)]


def test_shapes_and_layout():
    batch = rd.sample_questions(5, 4, generator=gen(), trajectories=3)
    assert batch.prompt_ids.shape == (5, 12) and batch.prompt_ids.dtype == torch.int64
    assert batch.trajectory_ids.shape == (5, 3, 4, rd.STEP_TOKENS)
    assert batch.answer_ids.shape == (5, 1)
    assert batch.flat_trajectories().shape == (5, 3, 24)
    sequences = batch.sequences(1)
    assert sequences.shape == (5, 12 + 24 + 3)
    assert torch.equal(sequences[:, 12:36], batch.flat_trajectories()[:, 1])
    text = rd.decode(sequences[0]).split()
    assert text[:2] == ["<bos>", "Q:"] and text[11] == "T:"
    assert text[-3:] == ["A:", str(int(batch.answer[0])), "<eos>"]
    assert 20 <= rd.VOCAB_SIZE <= 48
    assert int(batch.prompt_ids.max()) < rd.VOCAB_SIZE


def test_prompt_states_the_question_and_answer_is_the_chain():
    batch = rd.sample_questions(50, 5, generator=gen(1))
    for i in range(50):
        words = rd.decode(batch.prompt_ids[i]).split()
        running = int(words[2])
        for t in range(5):
            running = eval_step(running, words[3 + 2 * t], int(words[4 + 2 * t]))
            assert running == int(batch.results[i, t])
        assert running == int(batch.answer[i])
        multipliers = [int(words[4 + 2 * t]) for t in range(5) if words[3 + 2 * t] == "*"]
        assert set(multipliers) <= {1, 3, 7, 9}


def test_every_step_of_every_trajectory_is_right():
    batch = rd.sample_questions(40, 6, generator=gen(2), trajectories=4)
    forms = set()
    for i in range(40):
        for k in range(4):
            previous = int(batch.start[i])
            for t, (a, op, b, eq, c, end) in enumerate(parse_text(batch, i, k)):
                assert (eq, end) == ("=", ";")
                a, b, c = int(a), int(b), int(c)
                assert eval_step(a, op, b) == c == int(batch.results[i, t])
                assert previous in (a, b)  # the step restates the running value
                true_op = "+-*"[int(batch.ops[i, t])]
                if k == 0:  # the canonical form
                    assert (a, op, b) == (previous, true_op, int(batch.operands[i, t]))
                forms.add((true_op, op, a == previous))
                previous = c
    # every written form occurs: + as +, commuted +, -;  - as -, + and commuted +;  * both ways
    assert forms >= {("+", "+", True), ("+", "+", False), ("+", "-", True), ("-", "-", True),
                     ("-", "+", True), ("-", "+", False), ("*", "*", True), ("*", "*", False)}


def test_deterministic_given_the_generator():
    first = rd.sample_questions(8, 3, generator=gen(3), trajectories=2)
    torch.manual_seed(123)  # the global RNG plays no part
    second = rd.sample_questions(8, 3, generator=gen(3), trajectories=2)
    other = rd.sample_questions(8, 3, generator=gen(4), trajectories=2)
    for name in ("prompt_ids", "trajectory_ids", "answer_ids", "results"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert not torch.equal(first.prompt_ids, other.prompt_ids)
    # K and the trajectory mode do not change the questions themselves
    plain = rd.sample_questions(8, 3, generator=gen(3), trajectories=2, with_trajectory=False)
    assert torch.equal(plain.prompt_ids, first.prompt_ids)
    assert plain.trajectory_ids.shape == (8, 2, 0, rd.STEP_TOKENS)
    assert plain.sequences().shape == (8, 10 + 3)


def test_corrupt_is_wrong_from_the_corrupted_step_on():
    batch = rd.sample_questions(64, 5, generator=gen(5), trajectories=3)
    corrupted, step = rd.corrupt(batch.trajectory_ids, generator=gen(6))
    assert corrupted.shape == batch.trajectory_ids.shape and step.shape == (64, 3)
    assert set(step.unique().tolist()) == set(range(5))
    left, op, right, result = rd.parse_steps(corrupted)
    right_arith = rd.apply_op(left, op, right) == result
    true_result = result == batch.results[:, None]
    t = torch.arange(5)
    before, at, after = t < step[..., None], t == step[..., None], t > step[..., None]
    assert torch.equal(corrupted[before], batch.trajectory_ids[before])
    assert not right_arith[at].any()          # the corrupted step is arithmetically wrong
    assert right_arith[after].all()           # later steps compute right from a wrong value
    assert not true_result[at | after].any()  # and every result from step s on is wrong
    assert not (result[..., -1] == batch.answer[:, None]).any()
    for i in range(3):  # the text still reads as a chain: each step restates the last result
        words = rd.decode(corrupted[i, 0]).split()
        for s in range(1, 5):
            assert words[6 * s - 2] in (words[6 * s], words[6 * s + 2])


def test_corrupt_given_step_and_determinism():
    batch = rd.sample_questions(6, 4, generator=gen(7))
    one, step = rd.corrupt(batch.trajectory_ids[:, 0], generator=gen(8), step=2)
    assert torch.equal(step, torch.full((6,), 2))
    again, _ = rd.corrupt(batch.trajectory_ids[:, 0], generator=gen(8), step=2)
    assert torch.equal(one, again)
    assert torch.equal(one[:, :2], batch.trajectory_ids[:, 0, :2])
    assert (one[:, 2:] != batch.trajectory_ids[:, 0, 2:]).any(-1).all()
    # 1-D-per-trajectory use, e.g. from the analysis: one trajectory [S, 6]
    single, step = rd.corrupt(batch.trajectory_ids[0, 0], generator=gen(9), step=3)
    assert single.shape == (4, 6) and step.shape == ()


def test_encode_decode_round_trip():
    batch = rd.sample_questions(4, 3, generator=gen(10), trajectories=2)
    for ids in (batch.sequences(0)[0], batch.sequences(1)[3], batch.trajectory_ids[2, 1]):
        assert torch.equal(rd.encode(rd.decode(ids)), ids.reshape(-1))
    assert rd.decode(rd.encode("Q: 3 + 4 T:")) == "Q: 3 + 4 T:"
    assert torch.equal(rd.encode(["<bos>", "7"]), torch.tensor([rd.BOS, rd.DIGIT0 + 7]))
    assert len(set(rd.TOKENS)) == rd.VOCAB_SIZE


def test_bad_input():
    with pytest.raises(ValueError, match="vocabulary"):
        rd.encode("Q: 12")
    with pytest.raises(ValueError, match="ids"):
        rd.decode(torch.tensor([rd.VOCAB_SIZE]))
    with pytest.raises(TypeError, match="ids"):
        rd.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="steps"):
        rd.sample_questions(2, 0, generator=gen())
    with pytest.raises(ValueError, match="trajectories"):
        rd.sample_questions(2, 2, generator=gen(), trajectories=0)
    with pytest.raises(TypeError, match="generator"):
        rd.sample_questions(2, 2, generator=0)
    batch = rd.sample_questions(3, 3, generator=gen())
    with pytest.raises(ValueError, match="step"):
        rd.corrupt(batch.trajectory_ids, generator=gen(), step=3)
    with pytest.raises(ValueError, match="trajectory_ids"):
        rd.corrupt(batch.prompt_ids, generator=gen())
    with pytest.raises(ValueError, match="no steps"):
        rd.corrupt(batch.trajectory_ids[:, :, :0], generator=gen())
    with pytest.raises(ValueError, match="not a chain"):
        rd.corrupt(rd.encode("1 + 2 = 3 ; 5 + 5 = 0 ;").view(2, 6), generator=gen(), step=0)
    with pytest.raises(ValueError, match="unit"):
        rd.corrupt(rd.encode("1 + 2 = 3 ; 3 * 2 = 6 ;").view(2, 6), generator=gen(), step=0)
    with pytest.raises(ValueError, match="digit op digit"):
        rd.corrupt(rd.encode("1 + 2 = 3 ; 3 * 2 = 6 =").view(2, 6), generator=gen(), step=0)
