"""The attention implementation the reasoning task's transformer and answer_loss_curve choose
(metakernels/_attention.py): flash-attn where it can run (the GPU test, where flash-attn is
installed), SDPA otherwise, eager where a custom mask needs it and SDPA is not there."""

from __future__ import annotations

import pytest
import torch

from metakernels import _attention
from metakernels.analysis import answer_loss_curve, answer_loss_curve_loop

transformers = pytest.importorskip("transformers")

VOCAB = 23


def gpt2(attention: str, dtype=torch.float32, cls=None):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, attn_implementation=attention)
    return (cls or transformers.GPT2LMHeadModel)(config).to(dtype).eval()


def ids(length, seed):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def flash(monkeypatch):
    """flash-attn as usable (True) or not (False) for choose(), whatever is installed."""
    def set_usable(usable: bool):
        monkeypatch.setattr(_attention, "flash_attn_usable", lambda: usable)
    return set_usable


def test_choose(flash):
    gpt2_class = transformers.GPT2Model
    flash(True)
    for device, dtype in (("cuda", torch.bfloat16), ("cuda:1", torch.float16)):
        implementation, _ = _attention.choose(gpt2_class, device, dtype, custom_mask=False)
        assert implementation == "flash_attention_2"
    for device, dtype, mask, why in [
            ("cuda", torch.bfloat16, True, "a custom 4-D attention mask, which flash-attn does "
                                           "not read"),
            ("cpu", torch.bfloat16, False, "flash-attn runs on CUDA, this model on cpu"),
            ("cuda", torch.float32, False, "flash-attn runs float16 and bfloat16, this model "
                                           "float32")]:
        assert _attention.choose(gpt2_class, device, dtype, custom_mask=mask) == ("sdpa", why)
    flash(False)
    assert _attention.choose(gpt2_class, "cuda", torch.bfloat16, custom_mask=False) == (
        "sdpa", "flash-attn is not installed")

    class NoSdpa(transformers.GPT2Model):
        _supports_sdpa = False
        _supports_flash_attn = False

    implementation, why = _attention.choose(NoSdpa, "cpu", torch.float32, custom_mask=True)
    assert implementation == "eager" and why.endswith("NoSdpa has no SDPA path")


def test_flash_attn_absent_here_gives_sdpa():
    if _attention.flash_attn_usable():
        pytest.skip("flash-attn is usable here: the GPU test covers it")
    assert _attention.choose(transformers.GPT2Model, "cpu", torch.float32,
                             custom_mask=False)[0] == "sdpa"


def test_sdpa_reads_a_4d_mask_as_eager_does():
    """What the choice rests on (transformers 5): SDPA applies a custom additive 4-D mask."""
    eager, sdpa = gpt2("eager", torch.float64), gpt2("sdpa", torch.float64)
    sdpa.load_state_dict(eager.state_dict())
    length = 12
    allowed = torch.rand(length, length, generator=torch.Generator().manual_seed(1)) < 0.5
    allowed |= torch.eye(length, dtype=torch.bool)
    allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(length, length, dtype=torch.float64).masked_fill_(
        ~allowed, torch.finfo(torch.float64).min)[None, None]
    tokens = ids(length, 2)[None]
    with torch.no_grad():
        out_eager = eager(input_ids=tokens, attention_mask=mask).logits
        out_sdpa = sdpa(input_ids=tokens, attention_mask=mask).logits
        plain = sdpa(input_ids=tokens).logits
    torch.testing.assert_close(out_sdpa, out_eager, rtol=0, atol=1e-10)
    assert (out_sdpa - plain).abs().max() > 1e-3   # the mask was applied


def _maskless(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An implementation that, like flash-attn, reads no custom mask: causal only."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def check_curve(model, args: tuple, atol: float, loop_model=None) -> None:
    """The one-pass curve of ``model`` against the per-prefix loop (on ``loop_model``, default
    the same model: the loop passes no custom mask)."""
    with torch.no_grad():
        curve = answer_loss_curve(model, *args)
        expected = answer_loss_curve_loop(loop_model or model, *args)
    torch.testing.assert_close(curve, expected, rtol=0, atol=atol)


def test_answer_loss_curve_switches_a_maskless_model_and_puts_it_back(capsys):
    transformers.AttentionInterface.register("maskless_for_test", _maskless)
    _attention._said.clear()
    model = gpt2("maskless_for_test")
    args = (ids(5, 0), ids(9, 1), ids(2, 2))
    check_curve(model, args, 1e-4)
    assert model.config._attn_implementation == "maskless_for_test"
    printed = capsys.readouterr().err
    assert printed.count("answer_loss_curve: attention sdpa") == 1
    assert "the model's own maskless_for_test is put back" in printed
    with torch.no_grad():
        answer_loss_curve(model, *args)
    assert "answer_loss_curve" not in capsys.readouterr().err   # said once
    # Put back as it was, even an implementation that could not be loaded again here.
    model.config._attn_implementation = "flash_attention_2"
    check_curve(model, args, 1e-4, loop_model=gpt2("sdpa"))
    assert model.config._attn_implementation == "flash_attention_2"


def test_answer_loss_curve_runs_eager_where_the_class_has_no_sdpa():
    class NoSdpa(transformers.GPT2LMHeadModel):
        _supports_sdpa = False

    model = gpt2("eager", torch.float64, cls=NoSdpa)
    check_curve(model, (ids(4, 3), ids(7, 4), ids(1, 5)), 1e-10)
    assert model.config._attn_implementation == "eager"


def test_reasoning_model_says_its_choice_once(capsys, tmp_path):
    from metakernels.train import TrainConfig
    from metakernels.train.loop import resolve
    from metakernels.train.tasks import make_task

    _attention._said.clear()
    for no_trajectory in (False, False, True):
        task = make_task("reasoning")
        config = resolve(TrainConfig(task="reasoning", algo="maml", out=str(tmp_path),
                                     no_trajectory=no_trajectory), task, None)
        task.configure(config)
        model = task.build_model(config)
        assert model.encoder.config._attn_implementation == "sdpa"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "reasoning task's transformer: attention sdpa (a custom 4-D attention mask, which "
        "flash-attn does not read)",
        "reasoning task's transformer: attention sdpa (flash-attn runs on CUDA, this model on "
        "cpu)"], lines


@pytest.mark.gpu
def test_flash_attention_where_installed():
    """On a GPU with flash-attn: chosen for bf16 without a custom mask, and the same logits as
    SDPA; the reasoning model (float32, block mask) and answer_loss_curve keep to SDPA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _attention.flash_attn_usable():
        pytest.skip("flash-attn is not installed here")
    implementation, _ = _attention.choose(transformers.GPT2LMHeadModel, "cuda", torch.bfloat16,
                                          custom_mask=False)
    assert implementation == "flash_attention_2"
    flash_model = gpt2("flash_attention_2", torch.bfloat16).cuda()
    sdpa_model = gpt2("sdpa", torch.bfloat16).cuda()
    sdpa_model.load_state_dict(flash_model.state_dict())
    tokens = ids(40, 6)[None].cuda()
    with torch.no_grad():
        torch.testing.assert_close(flash_model(input_ids=tokens).logits.float(),
                                   sdpa_model(input_ids=tokens).logits.float(),
                                   rtol=0, atol=5e-2)
    check_curve(flash_model, (ids(5, 7), ids(9, 8), ids(2, 9)), 5e-2, loop_model=sdpa_model)
    assert flash_model.config._attn_implementation == "flash_attention_2"
