"""What every Triton launcher shares: output allocation (NaN-poisoned for tests), block sizes and
the on-chip limits. Nothing here knows the maths; see the kernels' modules."""

from __future__ import annotations

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


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of the first tensor argument (Triton
    launches on the current device); a kernel too large for the card raises RuntimeError."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                kernel[grid](*args, **kwargs)
        else:
            kernel[grid](*args, **kwargs)
    except OutOfResources as error:
        raise RuntimeError(
            f"the triton backend keeps a task on-chip and {getattr(kernel, '__name__', 'a kernel')} "
            "at these sizes needs "
            f"more than the card has ({error}); use backend='cuda', 'cpu' or 'reference' for this "
            "shape") from error


def num_warps(*tile_sizes: int) -> int:
    return 8 if max(tile_sizes) > 2048 else 4


# tl.dot's input_precision for float32 inputs: "ieee" (exact float32 on CUDA cores, what the
# tests were written against) or "tf32x3" (three tf32 tensor-core products, float32-level
# accuracy, fewer registers and less shared memory); a knob to measure, not yet measured.
FLOAT32_DOT_PRECISION = "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32-accurate products (SPEC.md: 1e-4); half inputs, whose own
    rounding is as coarse as tf32's, get tensor-core tf32 on the float32 state."""
    return FLOAT32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def task_stride(t: torch.Tensor, per_task_dim: int) -> int:
    """A shared tensor has task stride 0; a per-task one, its own."""
    return t.stride(0) if t.dim() == per_task_dim else 0
