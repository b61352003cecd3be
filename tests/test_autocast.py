"""Every op under torch.autocast (docs/conventions.md, "Mixed precision"): a bfloat16 body beside a
float32 head, the op computing in float32 and returning float32, each input's gradient in its own
dtype, within the half-precision tolerance (2e-2) of the float32 call; and the label check that
runs once per call, with no host synchronisation on CUDA tensors (the GPU tests turn
torch.cuda.set_sync_debug_mode to "error")."""

from __future__ import annotations

import pytest
import torch

import metakernels as mk
from metakernels.nn import FastWeightLinear
from metakernels.ops import _checks
from conftest import COMPILED_BACKENDS, rel_err

BACKENDS = ["reference", *COMPILED_BACKENDS]
HALF_TOLERANCE = 2e-2
F32, BF16 = torch.float32, torch.bfloat16


def features(tasks: int, rows: int, d_in: int, seed: int) -> torch.Tensor:
    """A body's output: what autocast hands the head (bfloat16 under CPU autocast)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, rows, d_in, generator=gen) * d_in ** -0.5


def grads_of(value: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, leaves))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_fast_weight_linear_bf16_body_float32_head(backend, loss):
    """The issue's Done-when: a bf16-autocast call of FastWeightLinear on a float32 head works on
    the CPU and matches the float32 result within 2e-2, outputs and meta-gradients."""
    torch.manual_seed(0)
    tasks, shots, queries, d_feat, d_in, d_out = 5, 7, 9, 11, 13, 5
    body = torch.nn.Linear(d_feat, d_in)
    head = FastWeightLinear(d_in, d_out, steps=3, inner_lr=0.3, loss=loss, backend=backend)
    support_x, query_x = features(tasks, shots, d_feat, 1), features(tasks, queries, d_feat, 2)
    gen = torch.Generator().manual_seed(3)
    if loss == "mse":
        support_y = torch.randn(tasks, shots, d_out, generator=gen)
        query_y = torch.randn(tasks, queries, d_out, generator=gen)
    else:
        support_y = torch.randint(0, d_out, (tasks, shots), generator=gen)
        query_y = torch.randint(0, d_out, (tasks, queries), generator=gen)
    params = [head.weight, head.bias, body.weight, body.bias]

    def step():
        support, query = body(support_x), body(query_x)
        out = head.adapt(support, support_y)
        meta_loss = head.meta_loss(support, support_y, query, query_y)
        total = meta_loss + (head(query, out.weight, out.bias).float() ** 2).mean()
        return support, out, meta_loss, grads_of(total, params)

    want_support, want_out, want_loss, want_grads = step()
    with torch.autocast("cpu", dtype=BF16):
        support, out, meta_loss, got_grads = step()
    assert support.dtype == BF16 and want_support.dtype == F32  # autocast did change the body
    assert out.weight.dtype == out.bias.dtype == out.losses.dtype == meta_loss.dtype == F32
    for name, got, want in [("weight", out.weight, want_out.weight),
                            ("bias", out.bias, want_out.bias),
                            ("losses", out.losses, want_out.losses),
                            ("meta_loss", meta_loss, want_loss)]:
        assert rel_err(got, want) < HALF_TOLERANCE, (name, rel_err(got, want))
    for param, got, want in zip(params, got_grads, want_grads):
        assert got.dtype == param.dtype == F32
        assert rel_err(got, want) < HALF_TOLERANCE, rel_err(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_op_under_autocast_computes_in_the_head_dtype(backend):
    torch.manual_seed(1)
    tasks, steps, rows, d_in, d_out = 3, 4, 5, 7, 6
    weight = (torch.randn(d_in, d_out) * d_in ** -0.5).requires_grad_()
    x32 = features(tasks, rows, d_in, 4)
    y = torch.randn(tasks, rows, d_out)
    query = features(tasks, 2, d_in, 5)
    direction = torch.randn(tasks, d_in, d_out)
    x16 = x32.to(BF16).requires_grad_()
    x32 = x16.detach().float().requires_grad_()  # the same values: only the op's arithmetic differs

    def calls(x):
        out = mk.fast_weight_unroll(weight, x, y, 0.3, steps=steps, backend=backend)
        loss = mk.fast_weight_meta_loss(weight, x, y, 0.3, query, y[:, :2], steps=steps,
                                        backend=backend)
        hv = mk.linear_hvp(weight, x, direction, backend=backend)
        return out.weight, loss, hv.weight

    want = calls(x32)
    want_grads = grads_of(sum(t.square().sum() for t in want), [weight, x32])
    with torch.autocast("cpu", dtype=BF16):
        got = calls(x16)
    got_grads = grads_of(sum(t.square().sum() for t in got), [weight, x16])
    for g, w in zip(got, want):
        assert g.dtype == F32 and rel_err(g, w) < 1e-5, rel_err(g, w)
    assert got_grads[0].dtype == F32 and got_grads[1].dtype == BF16  # each in its input's dtype
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < HALF_TOLERANCE, rel_err(g, w)


def test_bf16_head_on_the_cpu_computes_in_float32_and_returns_bf16():
    weight = torch.randn(7, 6, dtype=BF16, requires_grad=True)
    x, y = torch.randn(3, 5, 7, dtype=BF16), torch.randn(3, 5, 6)
    with pytest.raises(ValueError, match="weight has dtype bfloat16"):
        mk.fast_weight_unroll(weight, x, y, 0.3, steps=2)  # outside autocast: refused as before
    with torch.autocast("cpu", dtype=BF16):
        out = mk.fast_weight_unroll(weight, x, y, 0.3, steps=2)
    want = mk.fast_weight_unroll(weight.float(), x.float(), y, 0.3, steps=2)
    assert out.weight.dtype == BF16 and rel_err(out.weight, want.weight) < HALF_TOLERANCE
    out.weight.float().sum().backward()
    assert weight.grad.dtype == BF16


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule_under_autocast_bf16_keys_float32_beta(backend):
    """What fla's DeltaNet layer hands the op under autocast: bfloat16 q, k, v from linear
    projections, a float32 beta from a sigmoid, a float32 state. On the CPU the op computes in
    float32, o comes back in q's dtype and the final state in float32 (as fla returns it)."""
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.nn.functional.normalize(torch.randn(2, 9, 3, 5, generator=gen), dim=-1)
            for _ in range(2))
    v, beta = torch.randn(2, 9, 3, 4, generator=gen), torch.rand(2, 9, 3, generator=gen)
    state = torch.randn(2, 3, 5, 4, generator=gen, requires_grad=True)
    q16, k16, v16 = (t.to(BF16).requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=BF16):
        o, final = mk.delta_rule(q16, k16, v16, beta, initial_state=state,
                                 output_final_state=True, backend=backend)
    want_o, want_final = mk.delta_rule(q16.float(), k16.float(), v16.float(), beta,
                                       initial_state=state, output_final_state=True,
                                       backend=backend)
    assert o.dtype == BF16 and final.dtype == F32
    assert rel_err(o, want_o) < HALF_TOLERANCE and rel_err(final, want_final) < HALF_TOLERANCE
    (o.float().sum() + final.sum()).backward()
    assert q16.grad.dtype == BF16 and state.grad.dtype == F32
    assert torch.isfinite(q16.grad.float()).all() and torch.isfinite(state.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_ops_under_autocast_bf16_body_float32_layers(backend):
    """The MLP ops under CPU autocast: bfloat16 support and query features from a body beside
    float32 layers compute in float32 and give the float32 call's loss and gradients."""
    gen = torch.Generator().manual_seed(11)
    layers = [torch.randn(3, 5, generator=gen, requires_grad=True),
              torch.randn(5, 2, generator=gen, requires_grad=True)]
    biases = [torch.randn(5, generator=gen), torch.randn(2, generator=gen)]
    x, qx = features(4, 6, 3, 1).to(BF16), features(4, 5, 3, 2).to(BF16)
    y, qy = torch.randn(4, 6, 2, generator=gen), torch.randn(4, 5, 2, generator=gen)
    with torch.autocast("cpu", dtype=BF16):
        loss = mk.fast_weight_mlp_meta_loss(layers, biases, x, y, 0.2, qx, qy, steps=2,
                                            activation="tanh", backend=backend)
        out = mk.fast_weight_mlp_unroll(layers, biases, x, y, 0.2, steps=2, backend=backend)
    want = mk.fast_weight_mlp_meta_loss(layers, biases, x.float(), y, 0.2, qx.float(), qy,
                                        steps=2, activation="tanh", backend=backend)
    assert loss.dtype == F32 and out.weights[0].dtype == F32
    assert rel_err(loss, want) < HALF_TOLERANCE
    for got, expected in zip(grads_of(loss, layers), grads_of(want, layers)):
        assert rel_err(got, expected) < HALF_TOLERANCE


def test_mixed_dtypes_outside_autocast_are_still_refused():
    weight, x, y = torch.randn(7, 6), torch.randn(3, 5, 7, dtype=BF16), torch.randn(3, 5, 6)
    with pytest.raises(ValueError, match="x has dtype bfloat16 but weight has float32"):
        mk.fast_weight_unroll(weight, x, y, 0.3, steps=2)


def test_autocast_under_torch_compile():
    # x arrives in bfloat16 (inductor would elide a float32 -> bfloat16 -> float32 round trip made
    # inside the graph, and so skip the rounding the eager call does).
    weight, x, y = torch.randn(7, 6), torch.randn(3, 5, 7, dtype=BF16), torch.randn(3, 5, 6)

    def call(weight, x, y):
        with torch.autocast("cpu", dtype=BF16):
            return mk.fast_weight_unroll(weight, x, y, 0.3, steps=2).weight

    got = torch.compile(call, fullgraph=True)(weight, x, y)
    want = mk.fast_weight_unroll(weight, x.float(), y, 0.3, steps=2).weight
    assert got.dtype == F32 and rel_err(got, want) < 1e-5


# --- the ce label check: once per call, never a host sync on CUDA tensors ------------------------

def ce_call(op, backend, labels):
    weight, x = torch.randn(7, 6), torch.randn(3, 5, 7)
    if op == "unroll":
        return mk.fast_weight_unroll(weight, x, labels, 0.3, steps=2, loss="ce", backend=backend)
    return mk.fast_weight_meta_loss(weight, x, labels, 0.3, x, labels, steps=2, loss="ce",
                                    backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["unroll", "meta_loss"])
def test_label_range_is_checked_once_per_labels(monkeypatch, backend, op):
    seen = []
    check = _checks.check_label_range
    monkeypatch.setattr(_checks, "check_label_range",
                        lambda name, labels, classes: (seen.append(name),
                                                       check(name, labels, classes)))
    labels = torch.arange(15).reshape(3, 5) % 6  # every class, 0 and 5 included
    ce_call(op, backend, labels)
    assert sorted(seen) == (["y"] if op == "unroll" else ["query_y", "y"]), seen
    with pytest.raises(ValueError, match=r"y holds labels in \[0, 6\], expected them in \[0, 6\)"):
        ce_call(op, backend, torch.where(labels == 5, 6, labels))


def test_label_range_is_not_read_from_a_device_tensor_unless_asked(monkeypatch):
    """A tensor off the CPU is not read back (meta tensors have no values to read: a read would
    raise), unless METAKERNELS_CHECK_LABELS=1 asks for it."""
    labels = torch.empty(3, 5, dtype=torch.long, device="meta")
    monkeypatch.delenv(_checks.CHECK_LABELS_ENV, raising=False)
    _checks.check_label_range("y", labels, 6)
    monkeypatch.setenv(_checks.CHECK_LABELS_ENV, "1")
    with pytest.raises((RuntimeError, NotImplementedError)):
        _checks.check_label_range("y", labels, 6)


CUDA_BACKENDS = ["reference", "triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_no_host_sync_on_cuda(backend, loss):
    """Forward and backward of every op on CUDA tensors, with any device-to-host synchronisation
    an error; under autocast too."""
    if backend not in mk.available_backends("cuda", F32):
        pytest.skip(f"backend {backend!r} is not available here")
    device = torch.device("cuda")
    tasks, steps, rows, d_in, d_out = 4, 3, 8, 16, 16
    weight = (torch.randn(d_in, d_out, device=device) / 4).requires_grad_()
    bias = torch.zeros(d_out, device=device, requires_grad=True)
    x = torch.randn(tasks, rows, d_in, device=device).requires_grad_()
    query = torch.randn(tasks, rows, d_in, device=device)
    if loss == "mse":
        y = torch.randn(tasks, rows, d_out, device=device)
    else:
        y = torch.randint(0, d_out, (tasks, rows), device=device)
    lr = torch.full((steps,), 0.3, device=device)
    direction = torch.randn(tasks, d_in, d_out, device=device)
    torch.cuda.synchronize()
    # Warm-up outside the check: the first calls load kernels and build caches.
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=BF16, enabled=autocast):
            inputs = x.to(BF16) if autocast else x
            for warm in (True, False):
                if not warm:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    out = mk.fast_weight_unroll(weight, inputs, y, lr, steps=steps, loss=loss,
                                                bias=bias, backend=backend)
                    meta = mk.fast_weight_meta_loss(weight, inputs, y, lr, query, y, steps=steps,
                                                    loss=loss, bias=bias, backend=backend)
                    hv = mk.linear_hvp(weight, inputs, direction, loss=loss, bias=bias,
                                       backend=backend)
                    total = (out.weight.float().square().sum() + meta.float()
                             + hv.weight.float().square().sum())
                    total.backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(weight.grad).all()
