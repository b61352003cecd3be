"""Argument checks shared by the ops (docs/conventions.md, "Bad input").

Every problem raises before any kernel runs: ``TypeError`` for a wrong Python type, ``ValueError``
for a wrong shape, dtype, device or value, each naming the argument, what it got and what it
expected.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
LOSSES = ("mse", "ce")


def shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def require_tensor(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def check_loss(loss) -> str:
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a str, one of {LOSSES}, got {type(loss).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_float_dtype(weight: Tensor, backend: str = "auto", *, anchor: str = "weight"
                      ) -> torch.dtype:
    """The dtype of every floating input: that of ``weight`` (the argument named ``anchor``),
    which must be supported on its device."""
    supported = SUPPORTED_DTYPES.get(weight.device.type)
    if (backend == "triton" and weight.device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        # Triton's interpreter runs GPU dtypes on CPU tensors: how CI tests the Triton kernels.
        supported = supported + (torch.float16,)
    if supported is None:
        raise ValueError(f"{anchor} is on device {weight.device}; metakernels supports cpu and "
                         "cuda")
    if weight.dtype not in supported:
        names = ", ".join(dtype_name(d) for d in supported)
        raise ValueError(f"{anchor} has dtype {dtype_name(weight.dtype)}; "
                         f"on {weight.device.type} metakernels supports {names}")
    return weight.dtype


def check_same_dtype(name: str, tensor: Tensor | None, dtype: torch.dtype, *,
                     anchor: str = "weight") -> None:
    if tensor is not None and tensor.dtype != dtype:
        raise ValueError(f"{name} has dtype {dtype_name(tensor.dtype)} but {anchor} has "
                         f"{dtype_name(dtype)}; floating inputs must share one dtype")


def check_device(name: str, tensor: Tensor | None, device: torch.device, *,
                 anchor: str = "weight") -> None:
    if tensor is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but {anchor} is on {device}; "
                         "all tensor inputs must be on one device")


def check_shape(name: str, tensor: Tensor | None, *expected: tuple) -> None:
    """tensor's shape must be one of the expected shapes."""
    if tensor is None or tuple(tensor.shape) in [tuple(e) for e in expected]:
        return
    wanted = " or ".join(shape_str(e) for e in expected)
    raise ValueError(f"{name} has shape {shape_str(tensor.shape)}, expected {wanted}")


def check_steps(name: str, x: Tensor, steps) -> int:
    """T, the number of inner steps: ``steps`` for a 3-D ``x`` [B, n, d_in] (the same support set
    every step), the size of dimension 1 for a 4-D ``x`` [B, T, n, d_in] (where ``steps`` must be
    None)."""
    if x.dim() == 3:
        if steps is None:
            raise ValueError(f"steps is missing: {name} has shape {shape_str(x.shape)} "
                             "[B, n, d_in], the same support set every step, so pass steps=T")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return steps
    if x.dim() == 4:
        if steps is not None:
            raise ValueError(f"steps={steps!r} was given, but {name} has shape "
                             f"{shape_str(x.shape)} [B, T, n, d_in], which sets T itself; "
                             "leave steps=None")
        if x.shape[1] < 1:
            raise ValueError(f"{name} has shape {shape_str(x.shape)}: T = 0 steps, expected "
                             "at least 1")
        return x.shape[1]
    raise ValueError(f"{name} has shape {shape_str(x.shape)}, expected [B, n, d_in] "
                     "(with steps=T) or [B, T, n, d_in]")


def check_labels(name: str, labels: Tensor, classes: int) -> Tensor:
    """ce labels: an integer tensor; returned as int64. Their range is checked once per call by
    :func:`check_label_range`, where the op runs (``classes`` names d_out in the messages)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {str(labels.dtype).replace('torch.', '')}; loss='ce' "
                         "takes integer class labels (int64)")
    return labels.long()


# Set to 1: check the range of ce labels on CUDA tensors too (a device-to-host synchronisation
# per call). Without it, a label out of range on a GPU turns its task's outputs into NaN.
CHECK_LABELS_ENV = "METAKERNELS_CHECK_LABELS"


def check_label_range(name: str, labels: Tensor, classes: int) -> None:
    """Raises ValueError for ce labels outside [0, classes). Called once per call, just before
    the kernels (or the reference) run: eagerly inside the op's body, so also under
    torch.compile, whose graphs cannot branch on data. Skipped for CUDA tensors unless
    ``METAKERNELS_CHECK_LABELS=1``: reading the range back is a host synchronisation, and the
    kernels turn a label out of range into NaN, never a read out of bounds."""
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    if labels.device.type != "cpu" and os.environ.get(CHECK_LABELS_ENV, "0") in ("", "0"):
        return
    low, high = torch.stack(torch.aminmax(labels)).tolist()
    if low < 0 or high >= classes:
        raise ValueError(f"{name} holds labels in [{low}, {high}], expected them in "
                         f"[0, {classes}) (d_out = {classes})")
