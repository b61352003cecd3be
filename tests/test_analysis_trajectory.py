"""answer_loss_curve in one pass against the per-prefix loop, on tiny randomly initialised GPT-2
and Llama models (eager and SDPA attention), and its bad input."""

from __future__ import annotations

import pytest
import torch

from metakernels.analysis import answer_loss_curve, answer_loss_curve_loop

transformers = pytest.importorskip("transformers")

VOCAB = 29


def tiny_model(kind: str, attention: str, dtype=torch.float32, seed=0):
    """A randomly initialised 2-layer causal LM, built locally (never loaded from a hub)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=96, n_embd=32, n_layer=2,
                                         n_head=4, attn_implementation=attention)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=96,
                                          attn_implementation=attention)
        model = transformers.LlamaForCausalLM(config)
    assert model.config._attn_implementation == attention
    return model.to(dtype).eval()


def ids(length, seed):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


CASES = [  # (prompt, trajectory, answer, answer prefix, cut points)
    (7, 13, 1, 0, None),
    (5, 11, 3, 1, None),
    (1, 9, 2, 2, [9, 0, 4, 4, 1]),
    (6, 0, 2, 0, None),
]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_one_pass_equals_the_loop(kind, attention, dtype):
    model = tiny_model(kind, attention, dtype)
    for case, (n_prompt, n_steps, n_answer, n_prefix, cuts) in enumerate(CASES):
        args = (ids(n_prompt, case), ids(n_steps, 10 + case), ids(n_answer, 20 + case))
        prefix = ids(n_prefix, 30 + case) if n_prefix else None
        with torch.no_grad():
            curve = answer_loss_curve(model, *args, cuts, answer_prefix_ids=prefix)
            expected = answer_loss_curve_loop(model, *args, cuts, answer_prefix_ids=prefix)
        assert curve.shape == ((n_steps + 1,) if cuts is None else (len(cuts),))
        assert curve.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # Llama's rotary angles are float32 whatever the model's dtype (cos/sin of a float32
        # vector round by an ulp depending on where a position falls in the vector loop).
        tol = 1e-4 if dtype == torch.float32 else 1e-10 if kind == "gpt2" else 1e-7
        torch.testing.assert_close(curve, expected, rtol=0, atol=tol)
        if n_steps:  # the prefix changes the answer's loss
            assert curve.max() > curve.min()


def test_gradients_flow_through_the_one_pass():
    model = tiny_model("gpt2", "sdpa", torch.float64)
    args = (ids(4, 0), ids(6, 1), ids(2, 2))
    answer_loss_curve(model, *args).sum().backward()
    one_pass = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    answer_loss_curve_loop(model, *args).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(one_pass[name], param.grad, rtol=1e-9, atol=1e-12)


def test_bad_input():
    model = tiny_model("gpt2", "eager")
    prompt, steps, answer = ids(3, 0), ids(4, 1), ids(1, 2)
    with pytest.raises(ValueError, match="cut_points"):
        answer_loss_curve(model, prompt, steps, answer, [0, 5])
    with pytest.raises(ValueError, match="cut_points"):
        answer_loss_curve(model, prompt, steps, answer, [])
    with pytest.raises(TypeError, match="cut_points"):
        answer_loss_curve(model, prompt, steps, answer, [1.5])
    with pytest.raises(ValueError, match="prompt_ids"):
        answer_loss_curve(model, prompt[:0], steps, answer)
    with pytest.raises(ValueError, match="answer_ids"):
        answer_loss_curve(model, prompt, steps, answer[:0])
    with pytest.raises(ValueError, match="trajectory_ids"):
        answer_loss_curve(model, prompt, steps[None], answer)
    with pytest.raises(TypeError, match="answer_ids"):
        answer_loss_curve(model, prompt, steps, answer.float())
    with pytest.raises(TypeError, match="answer_prefix_ids"):
        answer_loss_curve(model, prompt, steps, answer, answer_prefix_ids=[1])
    # A model that cannot switch to an implementation that reads the 4-D mask
    # (tests/test_attention.py: one that can is switched for the call and put back).
    class Maskless:
        config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()

        def __call__(self, **kwargs):
            return model(**kwargs)

    with pytest.raises(ValueError, match="attention implementation"):
        answer_loss_curve(Maskless(), prompt, steps, answer)
