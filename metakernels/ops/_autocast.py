"""How every op runs under ``torch.autocast`` (docs/conventions.md, "Mixed precision").

Autocast hands an op whatever its neighbours produced: a bf16 body's features beside a float32
head, a float32 learning rate. The ops' contract wants one floating dtype, so an op decorated
with :func:`autocast_op` decides its own compute dtype when autocast is on for the device of its
inputs, as flash-linear-attention's ``autocast_custom_fwd`` does:

- the compute dtype is the anchor's (the first floating tensor argument: ``weight``,
  ``weights[0]``, ``q``) where the device runs it, else float32 (a bf16 or float16 anchor on the
  CPU); the fast-weight state and every accumulation are float32 or wider in any case;
- every floating tensor argument (inside lists and tuples too) is cast to it, integer labels are
  left alone, and the op runs with autocast off, so the reference's matmuls are not recast;
- every floating tensor it returns is cast back to the anchor's dtype: the dtype the caller's
  parameters have, as without autocast.

The casts are autograd operations, so each input's gradient comes back in its own dtype. Without
autocast the op runs unchanged (inputs of different dtypes are refused by ``_checks``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from metakernels.ops import _checks


def _floating(value) -> bool:
    return isinstance(value, Tensor) and value.dtype.is_floating_point


def _anchor(args, kwargs) -> Tensor | None:
    """The first floating tensor among the arguments (looking into lists and tuples)."""
    for value in list(args) + list(kwargs.values()):
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if _floating(item):
                return item
    return None


def _cast(value, dtype: torch.dtype):
    """``value`` with every floating tensor in it (lists, tuples and named tuples included) cast
    to ``dtype``."""
    if _floating(value):
        return value if value.dtype == dtype else value.to(dtype)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast(item, dtype) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype) for item in value)
    return value


def compute_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype an op computes in under autocast for an anchor of ``dtype`` on ``device_type``:
    its own where the device runs it, else float32."""
    supported = _checks.SUPPORTED_DTYPES.get(device_type, ())
    return dtype if dtype in supported else torch.float32


def autocast_op(op=None, *, keep_outputs: tuple[int, ...] = ()):
    """Makes the public op ``op`` run under ``torch.autocast`` as this module says. The outputs
    at the indices ``keep_outputs`` of a tuple result keep the dtype the op gave them (the delta
    rule's float32 final state beside half-type inputs, as flash-linear-attention returns it)."""
    if op is None:
        return functools.partial(autocast_op, keep_outputs=keep_outputs)

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        anchor = _anchor(args, kwargs)
        if anchor is None:
            return op(*args, **kwargs)
        device_type = anchor.device.type
        if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
            return op(*args, **kwargs)
        dtype = compute_dtype(anchor.dtype, device_type)
        with torch.autocast(device_type, enabled=False):
            out = op(*_cast(args, dtype),
                     **{name: _cast(value, dtype) for name, value in kwargs.items()})
        if keep_outputs and isinstance(out, tuple) and not hasattr(out, "_fields"):
            return tuple(item if index in keep_outputs else _cast(item, anchor.dtype)
                         for index, item in enumerate(out))
        return _cast(out, anchor.dtype)

    return wrapper
