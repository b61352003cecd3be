"""metakernels.nn.DeltaRule: the layer against its maths written with the reference recurrence,
gradients to every parameter, streaming (the state carried across calls equals one call over
the whole sequence), packed sequences equal one by one, the compiled backends against the
reference, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import COMPILED_BACKENDS, TOLERANCE, rel_err
from metakernels import reference
from metakernels.nn import DeltaRule

BACKENDS = ["reference"] + COMPILED_BACKENDS


def make_layer(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(hidden_size=10, num_heads=3, head_dim=5, value_dim=4)
    options.update(kwargs)
    return DeltaRule(**options).to(dtype)


def hidden(batch, length, dtype=torch.float64, seed=1, width=10):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=gen, dtype=torch.float64).to(dtype)


def written_out(layer, h, initial_state=None):
    """The layer's maths from the module docstring, its recurrence the reference's."""
    batch, length, _ = h.shape
    heads = (batch, length, layer.num_heads)
    q = F.normalize(F.silu(h @ layer.q_proj.weight.T).reshape(*heads, -1), dim=-1)
    k = F.normalize(F.silu(h @ layer.k_proj.weight.T).reshape(*heads, -1), dim=-1)
    v = (h @ layer.v_proj.weight.T).reshape(*heads, -1)
    beta = (torch.sigmoid(h @ layer.b_proj.weight.T) if layer.b_proj is not None
            else h.new_ones(heads))
    o, final = reference.delta_rule(q, k, v, beta, initial_state=initial_state,
                                    output_final_state=True)
    rms = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps)
    return (rms * layer.o_norm.weight).flatten(-2) @ layer.o_proj.weight.T, final


def grads_of(layer, out, final, extra=()):
    gen = torch.Generator().manual_seed(9)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)).sum() \
        + final.pow(2).sum()
    params = list(layer.parameters()) + list(extra)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("use_beta", [True, False])
@pytest.mark.parametrize("length", [1, 8, 13])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_written_out(backend, length, use_beta):
    """Any length, with an initial state: the output, final state and the gradients of every
    parameter and of the initial state, against the written-out layer (float64, 1e-10)."""
    layer = make_layer(backend=backend, use_beta=use_beta)
    h = hidden(2, length)
    state = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    out, final = layer(h, initial_state=state, output_final_state=True)
    want_out, want_final = written_out(layer, h, state)
    assert out.shape == h.shape and final.shape == (2, 3, 5, 4)
    assert rel_err(out, want_out) < 1e-10 and rel_err(final, want_final) < 1e-10
    for got, want in zip(grads_of(layer, out, final, [state]),
                         grads_of(layer, want_out, want_final, [state])):
        assert got.abs().sum() > 0
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_state_in_and_out(backend):
    """Reading 7 tokens, then 6 more from the state the first call returned, gives the output
    and final state of one call over the 13 tokens (and the same gradients)."""
    layer = make_layer(backend=backend)
    h = hidden(2, 13).requires_grad_()
    whole, whole_final = layer(h, output_final_state=True)
    first, state = layer(h[:, :7], output_final_state=True)
    second, final = layer(h[:, 7:], initial_state=state, output_final_state=True)
    streamed = torch.cat([first, second], 1)
    assert rel_err(streamed, whole) < 1e-12 and rel_err(final, whole_final) < 1e-12
    for got, want in zip(grads_of(layer, streamed, final, [h]),
                         grads_of(layer, whole, whole_final, [h])):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences(backend):
    """Sequences packed with cu_seqlens give each sequence's own output and final state."""
    layer = make_layer(backend=backend)
    lengths = [4, 9, 1]
    parts = [hidden(1, n, seed=20 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0] + lengths).cumsum(0)
    out, final = layer(torch.cat(parts, 1), cu_seqlens=cu, output_final_state=True)
    assert final.shape == (3, 3, 5, 4)
    for i, part in enumerate(parts):
        alone, alone_final = layer(part, output_final_state=True)
        assert rel_err(out[:, cu[i]:cu[i + 1]], alone) < 1e-12
        assert rel_err(final[i:i + 1], alone_final) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backend_matches_reference(backend, dtype):
    layer = make_layer(dtype, backend=backend, hidden_size=64, num_heads=1, head_dim=64,
                       value_dim=64)
    truth = make_layer(torch.float64, backend="reference", hidden_size=64, num_heads=1,
                       head_dim=64, value_dim=64)
    truth.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    h = hidden(2, 21, dtype=dtype, width=64)
    out, final = layer(h, output_final_state=True)
    want_out, want_final = truth(h.double(), output_final_state=True)
    assert out.dtype == dtype
    assert rel_err(out, want_out) < TOLERANCE[dtype]
    assert rel_err(final, want_final) < TOLERANCE[dtype]
    for got, want in zip(grads_of(layer, out, final), grads_of(truth, want_out, want_final)):
        assert rel_err(got, want) < TOLERANCE[dtype]


def test_bad_input():
    layer = make_layer()
    with pytest.raises(ValueError, match="hidden_states has shape"):
        layer(hidden(2, 5, width=9))
    with pytest.raises(TypeError, match="hidden_states must be"):
        layer([[0.0] * 10])
    with pytest.raises(ValueError, match="initial_state has shape"):
        layer(hidden(2, 5), initial_state=torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_heads"):
        DeltaRule(8, 0)
    with pytest.raises(ValueError, match="head_dim"):
        DeltaRule(2, 4)  # hidden_size // num_heads = 0
    with pytest.raises(TypeError, match="use_beta"):
        DeltaRule(8, 2, use_beta=1)
