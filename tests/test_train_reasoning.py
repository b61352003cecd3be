"""The reasoning task: its encoder, its answer read out of the fast weights, its options, and
``metakernels analyze trajectory-loss``."""

from __future__ import annotations

import json

import pytest
import torch

from metakernels.cli import main as metakernels_main
from metakernels.train import TrainConfig, train
from metakernels.train.loop import resolve
from metakernels.train.tasks import make_task
from metakernels.train.tasks import reasoning_data as data
from test_train import PNG_MAGIC, check_outputs, tiny


def task_and_model(**options):
    task = make_task("reasoning")
    config = resolve(TrainConfig(task="reasoning", algo=options.pop("algo", "maml"), **options),
                     task, None)
    task.configure(config)
    torch.manual_seed(0)
    return task, task.build_model(config)


def test_each_step_is_encoded_after_the_question_alone():
    """The block-masked pass equals encoding every (question, step) pair on its own, at the
    step's positions in the whole sequence."""
    task, model = task_and_model(trajectories=2, trajectory_length=2)
    batch = task.sample(2, torch.Generator().manual_seed(1), "train")
    question, hidden = model.encode(batch)
    prompt = batch["prompt_ids"].shape[1]
    for b in range(2):
        alone = model.encoder(input_ids=batch["prompt_ids"][b:b + 1]).last_hidden_state[0, -1]
        assert torch.allclose(question[b], alone, atol=1e-5)
        for t in range(2):
            for k in range(2):
                ids = torch.cat([batch["prompt_ids"][b], batch["trajectory_ids"][b, k, t]])
                positions = torch.cat([torch.arange(prompt), prompt + 6 * t + torch.arange(6)])
                want = model.encoder(input_ids=ids[None], position_ids=positions[None]
                                     ).last_hidden_state[0, prompt:]
                chunk = (t * 2 + k) * 6        # chunk t holds step t of every trajectory
                assert torch.allclose(hidden[b, chunk:chunk + 6], want, atol=1e-5), (b, t, k)


def test_answer_loss_by_prefix_ends_at_the_adapted_answer():
    task, model = task_and_model(trajectory_length=3)
    batch = task.sample(5, torch.Generator().manual_seed(2), "train")
    with torch.no_grad():
        curve = model.answer_loss_by_prefix(batch)
        before = model.query_losses(model.unadapted(batch), batch)[0]
        after = model.query_losses(model.inner_loop(batch).pred, batch)[0]
    assert curve.shape == (5, 4)
    assert torch.allclose(curve[:, 0], before, atol=1e-5)
    assert torch.allclose(curve[:, -1], after, atol=1e-5)
    # Each prefix reads a different state: the curve is not constant.
    assert not torch.allclose(curve[:, 1], curve[:, 2])


def test_answer_every_step_trains_on_every_prefix():
    task, model = task_and_model(trajectory_length=3, answer_every_step=True)
    batch = task.sample(4, torch.Generator().manual_seed(4), "train")
    with torch.no_grad():
        curve = model.answer_loss_by_prefix(batch)
        training = model.query_losses(model.inner_loop(batch).pred, batch)[0]
        model.eval()
        final = model.query_losses(model.inner_loop(batch).pred, batch)[0]
    assert torch.allclose(training, curve[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(final, curve[:, -1], atol=1e-5)


def test_the_answer_depends_on_the_trajectory_and_not_without_one():
    task, model = task_and_model(trajectory_length=2)
    correct, corrupted = task.sample_with_corruption(6, torch.Generator().manual_seed(3))
    assert torch.equal(correct["prompt_ids"], corrupted["prompt_ids"])
    assert torch.equal(correct["answer"], corrupted["answer"])
    # The corrupted trajectories end on a wrong result.
    final_result = (..., 0, -1, 4)   # trajectory 0, last step, the result digit
    assert (corrupted["trajectory_ids"][final_result]
            != correct["trajectory_ids"][final_result]).all()
    with torch.no_grad():
        a = model.inner_loop(correct).pred
        b = model.inner_loop(corrupted).pred
    assert not torch.allclose(a, b)
    task, model = task_and_model(trajectory_length=2, no_trajectory=True)
    batch = task.sample(4, torch.Generator().manual_seed(3), "train")
    assert batch["trajectory_ids"].shape == (4, 1, 0, 6)
    with torch.no_grad():
        adapted = model.inner_loop(batch)
    assert torch.equal(adapted.pred, model.unadapted(batch))


@pytest.mark.parametrize("options", [{"trajectories": 3}, {"no_trajectory": True},
                                     {"answer_every_step": True}])
def test_reasoning_options_train(tmp_path, options):
    config = tiny("reasoning", "maml", tmp_path, **options)
    train(config)
    check_outputs(tmp_path, config, classification=True)


def test_reasoning_refuses_inner_steps(tmp_path):
    with pytest.raises(ValueError, match="--inner-steps does not apply"):
        train(tiny("reasoning", "maml", tmp_path, inner_steps=3))


def test_analyze_trajectory_loss(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny("reasoning", "fomaml", run, trajectory_length=3))
    capsys.readouterr()
    assert metakernels_main(["analyze", "trajectory-loss", "--run", str(run),
                             "--questions", "7"]) == 0
    assert (run / "trajectory_loss.png").read_bytes()[:8] == PNG_MAGIC
    curves = json.loads((run / "trajectory_loss.json").read_text())
    assert set(curves) == {"correct", "corrupted"}
    assert all(len(c) == 4 for c in curves.values())
    # Before any chunk is read the two agree (same questions), at the end they differ.
    assert curves["correct"][0] == pytest.approx(curves["corrupted"][0])
    assert curves["correct"][-1] != pytest.approx(curves["corrupted"][-1])
    # A run of another task is refused with a reason.
    other = tmp_path / "other"
    train(tiny("sinusoid", "maml", other))
    assert metakernels_main(["analyze", "trajectory-loss", "--run", str(other)]) == 2
    assert "--task reasoning" in capsys.readouterr().err


def test_vocabulary_is_tiny_and_the_model_local():
    _, model = task_and_model()
    assert model.encoder.config.vocab_size == data.VOCAB_SIZE < 64
    assert sum(p.numel() for p in model.parameters()) < 500_000
