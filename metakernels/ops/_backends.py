"""Which backends exist on this install, and which one a call uses.

Every compiled backend is a module of eager kernels with the signatures of
``metakernels/_C.pyi`` (``unroll_forward``, ``unroll_backward``, ``linear_hvp``, ...). The custom
ops in ``ops/`` take the backend's name as an argument and call :func:`kernels` with it, so
adding a backend means writing its module and one entry in :data:`REGISTRY` (how to load it,
the dtypes it runs on each device type, where ``auto`` may pick it), never touching an op.
CONTRIBUTING.md walks through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Callable, NamedTuple

import torch

from metakernels import _compat


class Refused(str):
    """Why metakernels chose not to load a compiled extension (metakernels/_compat.py): a whole
    sentence, where an import error's text is only the cause."""


def _import(name: str):
    try:
        return importlib.import_module(name), ""
    except ImportError as error:
        text = str(error)
        if "undefined symbol" in text:
            text += (" (it was probably built against another torch: rebuild metakernels with "
                     "`pip install --no-build-isolation -e .`)")
        return None, text


def _load_triton():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return None, f"triton is not installed ({error})"
    return _import("metakernels.triton")


def _load_compiled(name: str, problem: str | None):
    """(extension ``name`` or None, why not); it is not loaded where ``problem`` says why not."""
    if _compat.extensions_disabled():
        return None, Refused(f"{_compat.DISABLE_ENV}=1 is set")
    problem = _TORCH_PROBLEM or problem
    if problem is not None:
        return None, Refused(problem)
    return _import(name)


def _load_cpu():
    problem = _compat.cpu_problem(_BUILD_INFO, _compat.host_cpu_features())
    if problem is not None and not _compat.extensions_disabled() and _TORCH_PROBLEM is None:
        warnings.warn(f"{problem}. The cpu backend is unavailable; backend='auto' runs the "
                      f"reference on CPU tensors.", RuntimeWarning, stacklevel=2)
    return _load_compiled("metakernels._C", problem)


def _load_cuda():
    return _load_compiled("metakernels._C_cuda",
                          _compat.cuda_problem(_BUILD_INFO, torch.version.cuda))


class Backend(NamedTuple):
    """One compiled backend: everything the dispatch knows of it."""

    load: Callable      # () -> (its kernel module or None, why it is missing); called once
    dtypes: dict        # device type -> the dtypes it runs there (docs/conventions.md)
    auto: tuple         # the device types where backend="auto" may pick it
    missing: str        # what a missing module means, with {error}, the loader's reason


# The one place to register a backend. Its order is the speed order on every device type (the
# fastest first); "reference" (pure PyTorch, every dtype _checks accepts) comes after all.
# backend="auto" may pick a fused GPU backend once the GPU check (bench/gpu/check.sh: its GPU
# tests against the reference and its benchmark) has passed on a GPU. Neither the Triton nor the
# CUDA kernels of this release has yet, so auto runs the reference on CUDA tensors, and the
# fused kernels run when asked for by name. Triton runs on CPU tensors only in its interpreter,
# for tests.
REGISTRY = {
    "cpu": Backend(_load_cpu, {"cpu": (torch.float32, torch.float64)}, auto=("cpu",),
                   missing="metakernels was built without its C++ extension ({error})"),
    "cuda": Backend(_load_cuda, {"cuda": (torch.float32, torch.bfloat16, torch.float16)},
                    auto=(), missing="metakernels was built without CUDA ({error})"),
    "triton": Backend(_load_triton, {"cuda": (torch.float32, torch.bfloat16, torch.float16),
                                     "cpu": (torch.float32, torch.float16)},
                      auto=(), missing="{error}"),
}

BACKENDS = ("auto", "reference", *REGISTRY)
# Derived from REGISTRY: fastest first on each device type, and what auto may pick there.
PREFERENCE = {
    device: tuple(name for name, entry in REGISTRY.items() if device in entry.dtypes)
    + ("reference",)
    for device in ("cpu", "cuda")
}
AUTO_CHOICES = {
    device: tuple(name for name, entry in REGISTRY.items() if device in entry.auto)
    + ("reference",)
    for device in ("cpu", "cuda")
}
BACKEND_DTYPES = {name: entry.dtypes for name, entry in REGISTRY.items()}


# Before any compiled code loads: beside another torch than the build's, the compiled backends
# are left out with the reason (the reference and Triton backends need no compiled code).
_BUILD_INFO = _compat.load_build_info()
_TORCH_PROBLEM = (_compat.torch_problem(_BUILD_INFO, torch.__version__)
                  if importlib.util.find_spec("metakernels._C") is not None else None)
if _TORCH_PROBLEM is not None and not _compat.extensions_disabled():
    warnings.warn(f"{_TORCH_PROBLEM} The cpu and cuda backends are unavailable; backend='auto' "
                  f"runs the reference.", RuntimeWarning, stacklevel=2)
# Each entry: (module or None, why it is missing). The cpu extension is loaded once at import,
# so that torch.compile traces a plain read; the others on first use.
_LOADED: dict = {"cpu": REGISTRY["cpu"].load()}


def _extension():
    """(metakernels._C or None, the import error's text)."""
    return _LOADED["cpu"]


def extension():
    """The compiled module; raises RuntimeError saying why it is missing."""
    module, error = _extension()
    if isinstance(error, Refused):
        raise RuntimeError(f"metakernels' C++ extension is not loaded: {error}. Pass "
                           "backend='reference'.")
    if module is None:
        raise RuntimeError(
            "metakernels was built without its C++ extension (importing metakernels._C failed: "
            f"{error}). Build it with `pip install --no-build-isolation -e .`, or pass "
            "backend='reference'.")
    return module


def _module(name: str):
    """(the module implementing backend ``name`` or None, why it is missing)."""
    if name == "cpu":
        return _extension()
    if name not in _LOADED:
        _LOADED[name] = REGISTRY[name].load()
    return _LOADED[name]


def triton_interpreter() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with ``dtype``, or None when it can."""
    if name == "reference":
        return None
    module, error = _module(name)
    if isinstance(error, Refused):
        return error
    if module is None:
        return REGISTRY[name].missing.format(error=error)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch has no CUDA device"
    if name == "triton" and device.type == "cpu" and not triton_interpreter():
        return "Triton runs on CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
    dtypes = BACKEND_DTYPES[name].get(device.type)
    if dtypes is None:
        return f"it does not run on {device.type} tensors"
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"it runs {names} on {device.type}, not {str(dtype).replace('torch.', '')}"
    return None


def kernels(name: str):
    """The module of eager kernels of compiled backend ``name`` (``cpu``, ``triton``, ``cuda``)."""
    module, error = _module(name)
    if module is None:
        if name == "cpu":
            extension()
        raise RuntimeError(f"backend {name!r} is not available: {error}")
    return module


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")


def available_backends(device=None, dtype: torch.dtype | None = None) -> list[str]:
    """The backends that can run on ``device`` (default cpu), and on ``dtype`` if given, fastest
    first; ``"reference"`` is always last.

    ``backend="auto"`` takes the first of them that it may pick on the device type: on CPU
    tensors the ``cpu`` backend where it is here, on CUDA tensors the reference, until the fused
    GPU backends of a release have passed the GPU check (docs/conventions.md, "Dtypes, devices and
    backends"); a backend listed here and not picked by ``auto`` runs when asked for by name."""
    device = _as_device(device)
    order = PREFERENCE.get(device.type, ("reference",))
    return [name for name in order if _unavailable(name, device, dtype) is None]


def resolve(backend, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call runs on: ``backend`` itself if it can run, the fastest one for ``auto``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        names = available_backends(device, dtype)
        chosen = next(name for name in names
                      if name in AUTO_CHOICES.get(device.type, ("reference",)))
        if chosen == "reference" and names[0] != "reference":
            _warn_unvalidated(device, names)
        return chosen
    why = _unavailable(backend, device, dtype)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is not available for {device.type} "
                           f"{str(dtype).replace('torch.', '')} inputs: {why} (available there: "
                           f"{available_backends(device, dtype)})")
    return backend


_WARNED: set = set()


def _warn_unvalidated(device: torch.device, names: list[str]) -> None:
    """Says once per device type why ``auto`` took the reference although fused kernels exist."""
    if device.type in _WARNED:
        return
    _WARNED.add(device.type)
    fused = [name for name in names if name != "reference"]
    warnings.warn(
        f"metakernels: backend='auto' runs the reference backend on {device.type} tensors: the "
        f"fused {' and '.join(fused)} backend(s) of this release have not yet passed the GPU "
        f"check on a GPU. Pass backend={fused[0]!r} to run them (see README, Backends).",
        stacklevel=4)
