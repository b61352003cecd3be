"""FastWeightLinear against an independent unrolled loop (plain autograd, create_graph)."""

from __future__ import annotations

import pytest
import torch

import metakernels as mk
from metakernels.nn import FastWeightLinear
from conftest import COMPILED_BACKENDS, rel_err

BACKENDS = ["reference", *COMPILED_BACKENDS]


def unrolled(layer: FastWeightLinear, support_x, support_y, steps, first_order=False):
    """Every task's adapted (W, b) by T explicit gradient steps of the layer's inner loss."""
    weight = layer.weight.expand(support_x.shape[0], *layer.weight.shape)
    bias = layer.bias.expand(support_x.shape[0], *layer.bias.shape)
    for t in range(steps):
        x_t = support_x[:, t] if support_x.dim() == 4 else support_x
        y_t = support_y[:, t] if support_x.dim() == 4 else support_y
        z = torch.bmm(x_t, weight) + bias[:, None]
        if layer.loss == "mse":
            inner = 0.5 * (z - y_t).pow(2).sum() / x_t.shape[1]
        else:
            inner = torch.nn.functional.cross_entropy(z.flatten(0, 1), y_t.flatten(),
                                                      reduction="sum") / x_t.shape[1]
        g_w, g_b = torch.autograd.grad(inner, (weight, bias), create_graph=not first_order)
        scale_w = 1 if layer.lr_scale is None else layer.lr_scale
        scale_b = 1 if layer.bias_lr_scale is None else layer.bias_lr_scale
        weight = weight - layer.inner_lr[t] * scale_w * g_w
        bias = bias - layer.inner_lr[t] * scale_b * g_b
    return weight, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("variant", ["maml", "maml++", "meta-sgd", "trajectory", "first-order"])
def test_adapt_matches_unrolled_loop(backend, loss, variant):
    torch.manual_seed(0)
    tasks, rows, d_in, d_out, steps = 3, 7, 5, 4, 3
    layer = FastWeightLinear(d_in, d_out, steps=steps, inner_lr=0.3, loss=loss,
                             learn_lr=variant in ("maml++", "meta-sgd"),
                             meta_sgd=variant == "meta-sgd", backend=backend).double()
    with torch.no_grad():   # learning rates and scales that differ per step and per entry
        layer.inner_lr.copy_(torch.tensor([0.3, 0.2, 0.4]))
        if layer.lr_scale is not None:
            layer.lr_scale.uniform_(0.5, 1.5)
            layer.bias_lr_scale.uniform_(0.5, 1.5)
    lead = (tasks, steps, rows) if variant == "trajectory" else (tasks, rows)
    support_x = torch.randn(*lead, d_in, dtype=torch.float64, requires_grad=True)
    support_y = (torch.randn(*lead, d_out, dtype=torch.float64) if loss == "mse"
                 else torch.randint(0, d_out, lead))
    query_x = torch.randn(tasks, 6, d_in, dtype=torch.float64)
    first_order = variant == "first-order"

    out = layer.adapt(support_x, support_y, steps=None if variant == "trajectory" else steps,
                      first_order=first_order)
    want_w, want_b = unrolled(layer, support_x, support_y, steps, first_order)
    assert rel_err(out.weight, want_w) < 1e-10 and rel_err(out.bias, want_b) < 1e-10
    assert out.losses.shape == (tasks, steps)

    leaves = [p for p in layer.parameters()] + ([] if first_order else [support_x])
    got = torch.autograd.grad(layer(query_x, out.weight, out.bias).square().sum(), leaves)
    want = torch.autograd.grad((torch.bmm(query_x, want_w) + want_b[:, None]).square().sum(),
                               leaves)
    for name, g, w in zip([n for n, _ in layer.named_parameters()] + ["support_x"], got, want):
        assert rel_err(g, w) < 1e-9, name


def test_forward_with_init_and_adapted_weights():
    layer = FastWeightLinear(4, 3, steps=2)
    x = torch.randn(2, 5, 4)
    assert torch.equal(layer(x), x @ layer.weight + layer.bias)
    weight, bias = torch.randn(2, 4, 3), torch.randn(2, 3)
    assert torch.allclose(layer(x, weight, bias), torch.bmm(x, weight) + bias[:, None])


def test_fewer_steps_use_the_first_learning_rates():
    layer = FastWeightLinear(4, 2, steps=3, learn_lr=True)
    x, y = torch.randn(2, 5, 4), torch.randn(2, 5, 2)
    short = layer.adapt(x, y, steps=2)
    direct = mk.fast_weight_unroll(layer.weight, x, y, layer.inner_lr[:2], steps=2,
                                   bias=layer.bias)
    assert torch.allclose(short.weight, direct.weight) and short.losses.shape == (2, 2)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 2.0}, TypeError, "steps"),
    ({"loss": "l1"}, ValueError, "loss"),
    ({"inner_lr": -1.0}, ValueError, "inner_lr"),
    ({"in_features": 0}, ValueError, "in_features"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastWeightLinear(**{"in_features": 4, "out_features": 2, **kwargs})


def test_bad_adapt_and_forward_arguments():
    layer = FastWeightLinear(4, 2, steps=2)
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    with pytest.raises(ValueError, match="learning rates for 2 steps"):
        layer.adapt(x, y, steps=3)
    with pytest.raises(ValueError, match="steps"):
        layer.adapt(x[:, None].expand(3, 2, 5, 4), y[:, None].expand(3, 2, 5, 2), steps=2)
    with pytest.raises(TypeError, match=r"takes steps by keyword.*adapt\(\.\.\., steps=3\)"):
        layer.adapt(x, y, 3)
    with pytest.raises(TypeError, match=r"meta_loss\(\.\.\., steps=2\)"):
        layer.meta_loss(x, y, x, y, 2)
    with pytest.raises(TypeError, match="support_x"):
        layer.adapt(x.tolist(), y)
    with pytest.raises(ValueError, match="y"):
        layer.adapt(x, y[..., :1])
    with pytest.raises(ValueError, match="weight"):
        layer(x, torch.randn(4, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="bias"):
        layer(x, torch.randn(3, 4, 2))
