"""FastWeightMemory: shapes, gradients to every parameter, the same numbers as a plain PyTorch
loop whose inner gradient comes from autograd, the compiled backends against the reference, and
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import COMPILED_BACKENDS, TOLERANCE, rel_err
from metakernels.nn import FastWeightMemory, MemoryState


def make_layer(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(d_model=11, d_key=7, d_value=5, chunk_size=3)
    options.update(kwargs)
    layer = FastWeightMemory(**options).to(dtype)
    with torch.no_grad():  # a learned lr per step that differs between steps
        layer.inner_lr_raw.add_(0.3 * torch.randn_like(layer.inner_lr_raw))
        if layer.init_bias is not None:
            layer.init_bias.normal_()
    return layer


def hidden_states(batch=2, chunks=4, layer=None, dtype=torch.float64, seed=1, extra=0):
    """``chunks`` whole chunks and ``extra`` more tokens (a shorter last chunk)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chunks * layer.chunk_size + extra, layer.d_model, generator=gen,
                       dtype=torch.float64).to(dtype)


def loop(layer: FastWeightMemory, hidden):
    """The layer written as a plain loop: chunk by chunk, the inner gradient of the mse from
    autograd (create_graph for second order), the readout of each chunk from the state after
    (readout="after") or before (readout="before") its step."""
    batch, length, _ = hidden.shape
    c = layer.chunk_size
    keys, values, queries = layer.to_key(hidden), layer.to_value(hidden), layer.to_query(hidden)
    if layer.normalize_keys:
        keys, queries = F.normalize(keys, dim=-1), F.normalize(queries, dim=-1)
    chunks = -(-length // c)  # the last one shorter where c does not divide L
    lr = layer.inner_lr(chunks).expand(chunks)
    outputs, losses = [], []
    weight = layer.init_weight.expand(batch, -1, -1)
    bias = None if layer.init_bias is None else layer.init_bias.expand(batch, -1)
    for t in range(chunks):
        rows = slice(t * c, min((t + 1) * c, length))
        x, y, q = keys[:, rows], values[:, rows], queries[:, rows]
        before = q @ weight + (0 if bias is None else bias.unsqueeze(1))
        logits = x @ weight + (0 if bias is None else bias.unsqueeze(1))
        loss = 0.5 * (logits - y).pow(2).sum((1, 2)) / x.shape[1]
        losses.append(loss.detach())
        params = [weight] if bias is None else [weight, bias]
        grads = torch.autograd.grad(loss.sum(), params, create_graph=not layer.first_order)
        weight = weight - lr[t] * grads[0]
        if bias is not None:
            bias = bias - lr[t] * grads[1]
        after = q @ weight + (0 if bias is None else bias.unsqueeze(1))
        outputs.append(after if layer.readout == "after" else before)
    return layer.to_out(torch.cat(outputs, 1)), weight, bias, torch.stack(losses, 1)


def outputs_and_grads(layer, hidden, run):
    out, weight, bias, losses = run(layer, hidden)
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    names, params = zip(*layer.named_parameters())
    # allow_unused: with first_order the keys and values get no gradient (see the layer).
    grads = torch.autograd.grad((out * cotangent).sum() + weight.pow(2).sum(), params,
                                allow_unused=layer.first_order)
    result = {"out": out, "weight": weight, "bias": bias, "losses": losses}
    result.update({f"grad_{n}": g for n, g in zip(names, grads)})
    return result


def run_layer(layer, hidden):
    out, state = layer(hidden, return_state=True)
    return out, state.weight, state.bias, state.losses


def assert_all_close(got, want, tol):
    assert got.keys() == want.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
            continue
        err = rel_err(got[key], want[key])
        assert err <= tol, f"{key}: relative error {err:.3e} > {tol:.0e}"


VARIANTS = [
    dict(),
    dict(bias=True, max_chunks=6),
    dict(readout="before", bias=True),
    dict(readout="before", max_chunks=5, normalize_keys=False, inner_lr=0.3),
    dict(first_order=True, bias=True, max_chunks=5),
    dict(chunk_size=1, d_value=9),
]


# (whole chunks, extra tokens): L a multiple of c, a shorter last chunk, shorter than one chunk.
LENGTHS = [(4, 0), (3, 2), (0, 2)]


@pytest.mark.parametrize("length", LENGTHS, ids=str)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_equals_plain_loop(variant, length):
    layer = make_layer(backend="reference", **VARIANTS[variant])
    if length[1] and layer.chunk_size == 1:
        pytest.skip("every length is a multiple of chunk_size = 1")
    hidden = hidden_states(layer=layer, chunks=length[0], extra=length[1])
    assert_all_close(outputs_and_grads(layer, hidden, run_layer),
                     outputs_and_grads(layer, hidden, loop), 1e-10)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_backend_matches_reference(backend, dtype, variant):
    layer = make_layer(dtype, backend=backend, **VARIANTS[variant])
    hidden = hidden_states(layer=layer, dtype=dtype, chunks=4, batch=3,
                           extra=1 if layer.chunk_size > 1 else 0)  # ≤ 5 chunks: max_chunks
    reference = make_layer(torch.float64, backend="reference", **VARIANTS[variant])
    reference.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    got = outputs_and_grads(layer, hidden, run_layer)
    assert all(v.dtype == dtype for v in got.values() if v is not None)
    assert_all_close(got, outputs_and_grads(reference, hidden.double(), run_layer),
                     TOLERANCE[dtype])


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_shapes_and_every_parameter_gets_a_gradient(variant):
    layer = make_layer(torch.float32, **VARIANTS[variant])
    hidden = hidden_states(batch=3, chunks=4, layer=layer, dtype=torch.float32)
    out, state = layer(hidden, return_state=True)
    assert isinstance(state, MemoryState)
    assert out.shape == hidden.shape
    assert state.weight.shape == (3, layer.d_key, layer.d_value)
    assert state.losses.shape == (3, 4) and not state.losses.requires_grad
    assert (state.bias is None) == (layer.init_bias is None)
    if state.bias is not None:
        assert state.bias.shape == (3, layer.d_value)
    out.pow(2).sum().backward()
    for name, param in layer.named_parameters():
        if layer.first_order and name in ("to_key.weight", "to_value.weight"):
            assert param.grad is None, name  # they enter only through the inner gradient
            continue
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert torch.equal(layer(hidden), out)  # return_state=False: the output alone


def test_what_each_token_sees():
    """Editing one token of chunk 2 (token 7, c = 3): readout="after" changes every token of
    chunk 2 and later and none before; readout="before" changes token 7 itself (its own query),
    every later chunk, and no other token of chunk 2 or before."""
    edited_token = 7
    for readout, unchanged in (("after", [0, 1, 2, 3, 4, 5]),
                               ("before", [0, 1, 2, 3, 4, 5, 6, 8])):
        layer = make_layer(readout=readout)
        hidden = hidden_states(layer=layer)
        edited = hidden.clone()
        edited[:, edited_token] += 1.0
        changed = (layer(hidden) - layer(edited)).abs().amax((0, 2)) > 0
        expected = torch.ones(hidden.shape[1], dtype=torch.bool)
        expected[unchanged] = False
        assert torch.equal(changed, expected), (readout, changed)


def test_inner_lr_is_positive_and_starts_at_inner_lr():
    layer = FastWeightMemory(8, 4, chunk_size=2, max_chunks=3, inner_lr=0.25)
    assert torch.allclose(layer.inner_lr(), torch.full((3,), 0.25))
    assert layer.inner_lr(2).shape == (2,)
    with torch.no_grad():
        layer.inner_lr_raw.fill_(-50.0)
    assert (layer.inner_lr() > 0).all()
    assert FastWeightMemory(8, 4, chunk_size=2).inner_lr().shape == ()


def test_bad_input():
    layer = FastWeightMemory(8, 4, chunk_size=3, max_chunks=2)
    with pytest.raises(ValueError, match="L = 0"):
        layer(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="max_chunks"):
        layer(torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match="3 chunks of up to 3 tokens"):
        layer(torch.randn(2, 7, 8))  # ⌈7/3⌉ = 3 chunks, 2 learned lrs
    assert layer(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match="hidden"):
        layer(torch.randn(6, 8))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(2, 6, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="hidden"):
        layer([[0.0] * 8])
    with pytest.raises(ValueError, match="chunk_size"):
        FastWeightMemory(8, 4, chunk_size=0)
    with pytest.raises(TypeError, match="d_key"):
        FastWeightMemory(8, 4.0, chunk_size=2)
    with pytest.raises(ValueError, match="inner_lr"):
        FastWeightMemory(8, 4, chunk_size=2, inner_lr=0.0)
    with pytest.raises(ValueError, match="readout"):
        FastWeightMemory(8, 4, chunk_size=2, readout="during")
    with pytest.raises(TypeError, match="first_order"):
        FastWeightMemory(8, 4, chunk_size=2, first_order=1)
    with pytest.raises(ValueError, match="backend"):
        FastWeightMemory(8, 4, chunk_size=2, backend="nope")(torch.randn(1, 2, 8))


@pytest.mark.parametrize("backend", ["reference"] + COMPILED_BACKENDS)
def test_read_every_chunk_any_length(backend):
    """read_every_chunk after every chunk of a sequence whose last chunk is shorter: entry t is
    the query read from the state the layer returns for the first t + 1 chunks alone."""
    layer = make_layer(backend=backend, bias=True, max_chunks=5)
    hidden = hidden_states(layer=layer, chunks=3, extra=2)
    query = hidden_states(layer=layer, chunks=1, seed=4)[:, :2]
    reads = layer.read_every_chunk(hidden, query)
    assert reads.shape == (2, 4, 2, layer.d_value)
    read = F.normalize(layer.to_query(query), dim=-1)
    for t, stop in enumerate([3, 6, 9, 11]):
        _, state = layer(hidden[:, :stop], return_state=True)
        want = read @ state.weight + state.bias.unsqueeze(1)
        assert rel_err(reads[:, t], want) < 1e-12, t
