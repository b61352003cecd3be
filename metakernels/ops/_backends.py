"""Which backends exist on this install, and which one a call uses."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def _load_extension():
    try:
        from metakernels import _C
    except ImportError as error:
        return None, str(error)
    return _C, ""


# Loaded once at import, not behind a cache decorator, so torch.compile traces a plain read.
_EXTENSION = _load_extension()


def _extension():
    """(metakernels._C or None, the import error's text)."""
    return _EXTENSION


def extension():
    """The compiled module; raises RuntimeError saying why it is missing."""
    module, error = _extension()
    if module is None:
        raise RuntimeError(
            "metakernels was built without its C++ extension (importing metakernels._C failed: "
            f"{error}). Build it with `pip install --no-build-isolation -e .`, or pass "
            "backend='reference'.")
    return module


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")


def available_backends(device=None) -> list[str]:
    """The backends that can run on ``device`` (default cpu), fastest first."""
    device = _as_device(device)
    names = []
    if device.type == "cpu" and _extension()[0] is not None:
        names.append("cpu")
    names.append("reference")
    return names


def resolve(backend, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call runs on: ``backend`` itself if it can run, the fastest one for ``auto``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device)[0]
    if backend == "reference":
        return backend
    if backend == "cpu":
        extension()
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' runs on CPU tensors, but the inputs are on {device}; "
                               f"available there: {available_backends(device)}")
        return backend
    raise RuntimeError(f"backend {backend!r} is not available: metakernels was built without it "
                       f"(available on {device}: {available_backends(device)})")
