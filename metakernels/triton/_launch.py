"""What every Triton launcher shares: output allocation (NaN-poisoned for tests), block sizes and
the on-chip limits. Nothing here knows the maths; see the kernels' modules."""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
from triton.runtime.errors import OutOfResources

# Tests set this so every output starts as NaN: an element a kernel forgets to write shows up.
_POISON = False

# The most float32 elements of one register tile ([d_in, d_out] weight tile, [n, d_in] support
# tile, [m, d_in] query tile). Beyond it a task does not fit on-chip in this backend, and the
# launchers raise rather than tile over n or d_in (see the package docstring). Below it, a kernel
# can still need more shared memory than the card has (float32 tl.dot stages its operands there);
# launch() turns Triton's OutOfResources into the same RuntimeError.
MAX_TILE = 128 * 128
# The column tile of mse kernels aims at this many elements of [d_in, BV]; 4096 float32 are 16
# registers per thread of 8 warps, which leaves room for the other tiles of the backward.
TARGET_WEIGHT_TILE = 4096
# tl.dot wants every dimension >= 16; smaller sizes are padded (masked) up to it.
MIN_BLOCK = 16


def set_poison_outputs(poison: bool) -> None:
    """Fill every output with NaN before the kernels write it (for tests)."""
    global _POISON
    _POISON = bool(poison)


def new_output(shape, dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def no_output(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device=like.device)


def block(size: int) -> int:
    """The padded power-of-two block that holds ``size`` (at least 16, for tl.dot)."""
    return max(MIN_BLOCK, triton.next_power_of_2(max(int(size), 1)))


def column_block(d_in: int, d_out: int, whole_rows: bool) -> int:
    """BV, the d_out columns one program owns: all of them for ce (the softmax couples them),
    else a tile of about TARGET_WEIGHT_TILE elements of the [d_in, BV] weight."""
    full = block(d_out)
    if whole_rows:
        return full
    return min(full, max(MIN_BLOCK, TARGET_WEIGHT_TILE // block(d_in)))


def check_fits(**tiles) -> None:
    """Raise RuntimeError when a register tile is larger than MAX_TILE elements."""
    for name, (rows, cols) in tiles.items():
        if rows * cols > MAX_TILE:
            raise RuntimeError(
                f"the triton backend keeps a task on-chip and its {name} tile "
                f"[{rows}, {cols}] (padded) exceeds {MAX_TILE} elements; use backend='cuda', "
                "'cpu' or 'reference' for this shape")


# CPU tensors run in Triton's interpreter, which is not thread-safe: one global builder holds the
# program id of the running program, and every launch patches triton.language and restores it at
# the end. Launches from several threads at once gave wrong values or raised ("Did you forget to
# add @triton.jit ?"), so they take turns.
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of the first tensor argument (Triton
    launches on the current device); a kernel too large for the card raises RuntimeError.
    Inside :func:`compile_only`, compiles the kernel for that GPU instead and runs nothing."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if _COMPILE_ONLY is not None:
        _compile_for_target(kernel, grid, args, kwargs)
        return
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                kernel[grid](*args, **kwargs)
        else:
            with _INTERPRETER_LOCK:
                kernel[grid](*args, **kwargs)
    except OutOfResources as error:
        raise RuntimeError(
            f"the triton backend keeps a task on-chip and {getattr(kernel, '__name__', 'a kernel')} "
            "at these sizes needs "
            f"more than the card has ({error}); use backend='cuda', 'cpu' or 'reference' for this "
            "shape") from error


# --- compile-only mode: the kernels' GPU compile checked without a GPU --------------------------

# (GPUTarget, the opt-in shared memory of that GPU in bytes, records) inside compile_only().
_COMPILE_ONLY = None
_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
                 torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}
# Opt-in shared memory per block, by compute capability (CUDA C programming guide).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@contextlib.contextmanager
def compile_only(capability: int = 90):
    """Within the block, every launch compiles its kernel for a CUDA GPU of this compute
    capability (Triton's compiler and ptxas, no GPU needed) and runs nothing; call the launchers
    with tensors on the ``meta`` device. Yields the list of records, one per launch:
    ``{"kernel", "grid", "shared_bytes"}``. A kernel needing more shared memory than that GPU
    offers raises the RuntimeError a real launch would."""
    global _COMPILE_ONLY
    from triton.backends.compiler import GPUTarget
    records: list = []
    _COMPILE_ONLY = (GPUTarget("cuda", capability, 32), SHARED_MEMORY_LIMIT.get(capability),
                     records)
    try:
        yield records
    finally:
        _COMPILE_ONLY = None


def _compile_for_target(kernel, grid, args, kwargs) -> None:
    from triton.compiler import ASTSource
    target, shared_limit, records = _COMPILE_ONLY
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    signature, constants = {}, {}
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name], constants[name] = "constexpr", None
        else:
            raise TypeError(f"compile_only: argument {name} of type {type(value).__name__}")
    for name, value in kwargs.items():
        signature[name], constants[name] = "constexpr", value
    signature = {name: signature[name] for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=target, options=options)
    shared = compiled.metadata.shared
    records.append({"kernel": kernel.__name__, "grid": tuple(grid), "shared_bytes": shared})
    if shared_limit is not None and shared > shared_limit:
        raise RuntimeError(
            f"the triton backend keeps a task on-chip and {kernel.__name__} at these sizes needs "
            f"more than the card has ({shared} bytes of shared memory, the limit is "
            f"{shared_limit}); use backend='cuda', 'cpu' or 'reference' for this shape")


def num_warps(*tile_sizes: int) -> int:
    return 8 if max(tile_sizes) > 2048 else 4


# tl.dot's input_precision for float32 inputs: "ieee" (exact float32 on CUDA cores, what the
# tests were written against) or "tf32x3" (three tf32 tensor-core products, float32-level
# accuracy, fewer registers and less shared memory); a knob to measure, not yet measured.
FLOAT32_DOT_PRECISION = "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32-accurate products (docs/conventions.md: 1e-4); half inputs, whose
    own rounding is as coarse as tf32's, get tensor-core tf32 on the float32 state."""
    return FLOAT32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def task_stride(t: torch.Tensor, per_task_dim: int) -> int:
    """A shared tensor has task stride 0; a per-task one, its own."""
    return t.stride(0) if t.dim() == per_task_dim else 0
