"""Bad input raises a ValueError or TypeError naming the argument, before any kernel runs
(docs/conventions.md, bad input), on every backend; unavailable backends raise RuntimeError saying
why."""

from __future__ import annotations

import re

import pytest
import torch

import metakernels as mk
from conftest import COMPILED_BACKENDS, Case, make_inputs

BACKENDS = ["reference"] + COMPILED_BACKENDS


def good(loss="mse", per_step=False, **case):
    kwargs = make_inputs(Case(loss=loss, per_step=per_step, **case))
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def replaced(kwargs, **changes):
    out = dict(kwargs)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()
B, T, N, D_IN, D_OUT = 3, 4, 5, 7, 6
f64 = dict(dtype=torch.float64)

BAD_UNROLL = [
    # (label, base kwargs, changes, error type, pattern the message must contain)
    ("weight not a tensor", good(), dict(weight=[[1.0]]), TypeError, r"weight must be a torch.Tensor"),
    ("weight 1-D", good(), dict(weight=torch.randn(6, **f64)), ValueError, r"weight has shape \[6\]"),
    ("weight wrong B", good(), dict(weight=torch.randn(2, D_IN, D_OUT, **f64)), ValueError,
     r"weight has shape \[2, 7, 6\], expected \[7, 6\] or \[3, 7, 6\]"),
    ("x d_in mismatch", good(), dict(x=torch.randn(B, N, D_IN + 1, **f64)), ValueError, r"weight has shape"),
    ("x 2-D", good(), dict(x=torch.randn(N, D_IN, **f64)), ValueError, r"x has shape \[5, 7\]"),
    ("y lead differs", good(), dict(y=torch.randn(B, N + 1, D_OUT, **f64)), ValueError,
     r"y has shape \[3, 6, 6\], expected \[3, 5, 6\]"),
    ("y d_out differs", good(), dict(y=torch.randn(B, N, D_OUT + 1, **f64)), ValueError, r"y has shape"),
    ("int labels for mse", good(), dict(y=torch.zeros(B, N, D_OUT, dtype=torch.long)), ValueError,
     r"y has dtype int64; loss='mse' takes float targets"),
    ("float labels for ce", good("ce"), dict(y=torch.zeros(B, N, **f64)), ValueError,
     r"y has dtype float64; loss='ce' takes integer class labels"),
    ("label too large", good("ce"), dict(y=torch.full((B, N), D_OUT, dtype=torch.long)), ValueError,
     r"y holds labels in \[6, 6\], expected them in \[0, 6\)"),
    ("label negative", good("ce"), dict(y=torch.full((B, N), -1, dtype=torch.long)), ValueError,
     r"y holds labels in \[-1, -1\]"),
    ("mixed float dtypes", good(), dict(x=torch.randn(B, N, D_IN)), ValueError,
     r"x has dtype float32 but weight has float64"),
    ("steps missing with 3-D x", good(), dict(steps=_DROP), ValueError, r"steps is missing"),
    ("steps given with 4-D x", good(per_step=True), dict(steps=4), ValueError, r"steps=4 was given"),
    ("steps < 1", good(), dict(steps=0), ValueError, r"steps must be at least 1, got 0"),
    ("steps not int", good(), dict(steps=2.0), TypeError, r"steps must be an int"),
    ("4-D x with T = 0", good(per_step=True),
     dict(x=torch.randn(B, 0, N, D_IN, **f64), y=torch.randn(B, 0, N, D_OUT, **f64)), ValueError,
     r"T = 0 steps"),
    ("n = 0", good(), dict(x=torch.randn(B, 0, D_IN, **f64), y=torch.randn(B, 0, D_OUT, **f64)),
     ValueError, r"n = 0 support rows"),
    ("lr shape does not broadcast", good(), dict(lr=torch.rand(B, **f64)), ValueError,
     r"lr has shape \[3\], which does not broadcast to \[B, T\] = \[3, 4\]"),
    ("lr 3-D", good(), dict(lr=torch.rand(1, B, T, **f64)), ValueError, r"lr has shape \[1, 3, 4\]"),
    ("lr a string", good(), dict(lr="0.1"), TypeError, r"lr must be a float or a tensor"),
    ("lr int tensor", good(), dict(lr=torch.ones(T, dtype=torch.long)), ValueError, r"lr has dtype int64"),
    ("lr other float dtype", good(), dict(lr=torch.rand(T)), ValueError, r"lr has dtype float32"),
    ("bias shape", good(), dict(bias=torch.randn(D_OUT + 1, **f64)), ValueError,
     r"bias has shape \[7\], expected \[6\] or \[3, 6\]"),
    ("lr_scale shape", good(), dict(lr_scale=torch.rand(D_OUT, D_IN, **f64)), ValueError,
     r"lr_scale has shape \[6, 7\], expected \[7, 6\]"),
    ("bias_lr_scale without bias", good(), dict(bias_lr_scale=torch.rand(D_OUT, **f64)), ValueError,
     r"bias_lr_scale was given without bias"),
    ("queries shape", good(), dict(queries=torch.randn(B, T + 1, 2, D_IN, **f64)), ValueError,
     r"queries has shape \[3, 5, 2, 7\]"),
    ("queries 3-D", good(), dict(queries=torch.randn(B, 2, D_IN, **f64)), ValueError, r"queries has shape"),
    ("loss unknown", good(), dict(loss="l1"), ValueError, r"loss must be one of"),
    ("loss not str", good(), dict(loss=0), TypeError, r"loss must be a str"),
    ("first_order not bool", good(), dict(first_order=1), TypeError, r"first_order must be a bool"),
    ("int weight", good(), dict(weight=torch.ones(D_IN, D_OUT, dtype=torch.long)), ValueError,
     r"weight has dtype int64"),
    ("half on cpu", good(), dict(weight=torch.randn(D_IN, D_OUT, dtype=torch.float16)), ValueError,
     r"weight has dtype float16; on cpu metakernels supports float32, float64"),
    ("device mismatch", good(), dict(x=torch.randn(B, N, D_IN, **f64, device="meta")), ValueError,
     r"x is on meta but weight is on cpu"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,kwargs,changes,error,pattern", BAD_UNROLL,
                         ids=[row[0] for row in BAD_UNROLL])
def test_bad_unroll_input(backend, label, kwargs, changes, error, pattern):
    with pytest.raises(error, match=pattern):
        mk.fast_weight_unroll(**replaced(kwargs, **changes), backend=backend)


def test_good_inputs_pass():
    """The base inputs of the table above are valid, so each row fails for its own change."""
    for kwargs in (good(), good("ce"), good(per_step=True)):
        mk.fast_weight_unroll(**kwargs)


def hvp_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(weight=torch.randn(D_IN, D_OUT, generator=gen, **f64),
                x=torch.randn(B, N, D_IN, generator=gen, **f64),
                v=torch.randn(B, D_IN, D_OUT, generator=gen, **f64))


BAD_HVP = [
    ("v shape", dict(v=torch.randn(D_IN, D_OUT, **f64)), ValueError, r"v has shape \[7, 6\], expected \[3, 7, 6\]"),
    ("x 4-D", dict(x=torch.randn(B, 1, N, D_IN, **f64)), ValueError, r"x has shape \[3, 1, 5, 7\]"),
    ("x d_in", dict(x=torch.randn(B, N, D_IN + 2, **f64)), ValueError, r"weight has shape|x has shape"),
    ("v dtype", dict(v=torch.randn(B, D_IN, D_OUT)), ValueError, r"v has dtype float32"),
    ("bias shape", dict(bias=torch.randn(2, **f64)), ValueError, r"bias has shape \[2\]"),
    ("v_bias shape", dict(v_bias=torch.randn(B, 2, **f64)), ValueError, r"v_bias has shape \[3, 2\]"),
    ("loss", dict(loss="hinge"), ValueError, r"loss must be one of"),
    ("v not tensor", dict(v=1.0), TypeError, r"v must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,changes,error,pattern", BAD_HVP, ids=[row[0] for row in BAD_HVP])
def test_bad_hvp_input(backend, label, changes, error, pattern):
    with pytest.raises(error, match=pattern):
        mk.linear_hvp(**dict(hvp_inputs(), **changes), backend=backend)


def test_backend_names():
    kwargs = good()
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mk.fast_weight_unroll(**kwargs, backend="gpu")
    with pytest.raises(TypeError, match=r"backend must be a str"):
        mk.fast_weight_unroll(**kwargs, backend=None)
    for missing in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=re.escape(f"backend '{missing}' is not available")):
            mk.fast_weight_unroll(**kwargs, backend=missing)


def test_available_backends():
    names = mk.available_backends("cpu")
    assert names[-1] == "reference"
    assert mk.available_backends() == names
    assert mk.available_backends(torch.device("cpu")) == names
    assert mk.available_backends("cuda") == ["reference"]
    with pytest.raises(TypeError, match="device must be"):
        mk.available_backends(0)


@pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built")
def test_cpu_backend_refuses_other_devices():
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in good().items()}
    with pytest.raises(ValueError, match=r"weight is on device meta"):
        mk.fast_weight_unroll(**kwargs, backend="cpu")


def test_missing_extension_is_explained(monkeypatch):
    from metakernels.ops import _backends
    monkeypatch.setattr(_backends, "_extension", lambda: (None, "No module named 'metakernels._C'"))
    assert mk.available_backends("cpu") == ["reference"]
    with pytest.raises(RuntimeError, match=r"metakernels was built without its C\+\+ extension"):
        mk.fast_weight_unroll(**good(), backend="cpu")
    # auto falls back to the reference and still answers.
    assert mk.fast_weight_unroll(**good()).weight.shape == (3, 7, 6)


@pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend built")
def test_out_of_range_label_reaching_the_op_is_refused():
    """The custom op checks labels itself, so a caller that skips metakernels.ops (or a compiled
    graph) still gets a ValueError, not a read out of bounds."""
    kwargs = good("ce")
    labels = torch.full((B, N), 99, dtype=torch.long)
    lr = torch.full((B, T), 0.1, **f64)
    with pytest.raises(ValueError, match=r"y holds labels"):
        torch.ops.metakernels.fast_weight_unroll_fwd(kwargs["weight"], kwargs["x"], labels, lr,
                                                     None, None, None, None, 1, False, False,
                                                     "cpu")


def test_auto_takes_only_validated_backends(monkeypatch):
    """On CUDA, ``auto`` runs the reference until the fused GPU backends have passed the GPU
    check, and says so once; asking for a fused backend by name still gets it."""
    from metakernels.ops import _backends
    monkeypatch.setattr(_backends, "_unavailable", lambda name, device, dtype: None)
    monkeypatch.setattr(_backends, "_WARNED", set())
    cuda = torch.device("cuda")
    assert _backends.available_backends(cuda) == ["cuda", "triton", "reference"]
    with pytest.warns(UserWarning, match=r"backend='auto' runs the reference backend on cuda"):
        assert _backends.resolve("auto", cuda, torch.float32) == "reference"
    assert _backends.resolve("cuda", cuda, torch.float32) == "cuda"
    assert _backends.resolve("triton", cuda, torch.bfloat16) == "triton"
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"
