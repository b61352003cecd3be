"""The roofline floor of one meta-step: the least time the card could take for a configuration's
FLOPs and compulsory bytes, with both ceilings measured on the same card in the same run.

Ceilings (:func:`measure_ceilings`): the matmul rate of ``torch.matmul`` on large square matrices
in each dtype (float32 with TF32 off, float32 with TF32 on, bfloat16, float16), and the copy
bandwidth of a device-to-device ``copy_`` (bytes read + bytes written per second).

Work model (:func:`work`), per task and step, n support rows, m readout rows, d = d_in, e = d_out:

- forward: ``Z_t = X_t W_t`` and ``G_t = X_tᵀ E_t``: 2 GEMMs of 2·n·d·e FLOPs;
- backward: ``U = X_t D`` and ``Ŵ_t = Ŵ_{t+1} + X_tᵀ Ẑ``: 2 GEMMs (x is data, not a
  meta-parameter, so its gradient ``X̂`` is not computed);
- a readout adds ``O_t = Q_t W_{t+1}`` forward and ``Ŵ_{t+1} += Q_tᵀ Ô_t`` backward: 2·2·m·d·e;
- without a readout, the outer loss on the query set (n rows) adds 2 GEMMs forward and back.
  Elementwise work (the loss gradient, the softmax, the update) is not counted.

Compulsory bytes: every input read once (x, y, the readout queries and targets or the query set,
the init, the lr) in the problem's dtype, labels as int64; the op's outputs written once and
their adjoints read once (the readout ``[B, T, m, e]``, or ``W_T`` ``[B, d, e]`` without one);
the meta-gradient written once.

docs/ops/fast_weight_unroll.md lets a backend store ``W_t`` for every step (float32, B·T·d·e·4 bytes
written in the forward, read in the backward) or recompute it from checkpoints (the forward's 2
GEMMs a step again, almost no state traffic). The floor is the lesser of the two strategies:
``min(max(F / R, (I + S) / BW), max((F + F_fwd) / R, I / BW))``, where F is the FLOPs above, I
the compulsory bytes, S the stored states' traffic, F_fwd the recomputed forward.
The achieved fraction of a measured time is ``floor / time``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from metakernels.benchmarks.configs import BenchConfig

STATE_BYTES = 4  # float32 state (docs/conventions.md, dtypes)


@dataclass(frozen=True)
class Work:
    """The work of one meta-step (forward + backward) of a configuration."""

    flops: float               # the GEMMs of the module docstring
    recompute_flops: float     # the forward GEMMs again, for a backend that recomputes W_t
    io_bytes: float            # compulsory bytes: inputs, outputs, their adjoints, the gradient
    state_bytes: float         # W_t for every step written once and read once, float32

    def floor_seconds(self, matmul_flops_per_s: float, bytes_per_s: float) -> float:
        """The roofline floor: the better of storing and recomputing the states."""
        store = max(self.flops / matmul_flops_per_s,
                    (self.io_bytes + self.state_bytes) / bytes_per_s)
        recompute = max((self.flops + self.recompute_flops) / matmul_flops_per_s,
                        self.io_bytes / bytes_per_s)
        return min(store, recompute)


def work(config: BenchConfig, dtype: torch.dtype) -> Work:
    """The FLOPs and bytes of the module docstring's model for one meta-step of ``config``."""
    c = config
    b, t, n, m, d, e = c.tasks, c.steps, c.support, c.queries, c.d_in, c.d_out
    gemm = 2.0 * d * e               # FLOPs of one GEMM per row
    forward = t * 2 * n * gemm       # Z_t and G_t
    backward = t * 2 * n * gemm      # U and X_tᵀ Ẑ
    outer = 2 * m * t * gemm if m else 2 * n * gemm   # readout or query set, forward + back
    flops = b * (forward + backward + outer)

    size = torch.empty((), dtype=dtype).element_size()
    label = torch.empty((), dtype=torch.int64).element_size()
    support_rows = b * (t if c.x_per_step else 1) * n
    target = e * size if c.loss == "mse" else label
    inputs = support_rows * (d * size + target)
    if m:
        inputs += b * t * m * (d * size + target)
        outputs = 2 * b * t * m * e * size           # the readout and its adjoint
    else:
        inputs += b * n * (d * size + target)        # the query set
        outputs = 2 * b * d * e * size               # W_T and its adjoint
    init = (1 if c.shared_init else b) * (d * e + (e if c.bias else 0)) * size
    io_bytes = inputs + outputs + 2 * init + t * 4   # the init read, its gradient written; lr
    state_bytes = 2.0 * b * t * d * e * STATE_BYTES
    return Work(flops=flops, recompute_flops=b * forward, io_bytes=float(io_bytes),
                state_bytes=state_bytes)


@dataclass
class Ceilings:
    """Measured ceilings of one device: matmul FLOP/s by name (``float32``, ``float32-tf32``,
    ``bfloat16``, ``float16``) and copy bandwidth in bytes/s."""

    device: str
    matmul_flops_per_s: dict[str, float]
    copy_bytes_per_s: float
    matmul_size: int
    copy_bytes: int

    def matmul_rate(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """The measured rate for ``dtype`` (float32 with TF32 when ``tf32`` and the device has
        it)."""
        name = str(dtype).replace("torch.", "")
        if dtype == torch.float32 and tf32 and "float32-tf32" in self.matmul_flops_per_s:
            name = "float32-tf32"
        return self.matmul_flops_per_s[name]

    def describe(self) -> str:
        rates = ", ".join(f"{name} {rate / 1e12:.3g} TFLOP/s"
                          for name, rate in self.matmul_flops_per_s.items())
        return (f"matmul ({self.matmul_size}² torch.matmul) {rates}; copy "
                f"({self.copy_bytes / 2**20:.0f} MiB copy_, read + write) "
                f"{self.copy_bytes_per_s / 1e9:.0f} GB/s")


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call; CUDA events on the GPU."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure_ceilings(device: str | torch.device, matmul_size: int | None = None,
                     copy_bytes: int | None = None, repeats: int = 10) -> Ceilings:
    """The matmul rate in each dtype the device runs and the copy bandwidth, measured now.

    Defaults: 8192² matrices and a 1 GiB copy on the GPU; 1024² and 256 MiB on the CPU (float32
    and float64 there, TF32 does not apply)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    size = matmul_size or (8192 if on_cuda else 1024)
    copy_bytes = copy_bytes or (2**30 if on_cuda else 2**28)
    dtypes = ((torch.float32, torch.bfloat16, torch.float16) if on_cuda
              else (torch.float32, torch.float64))
    rates: dict[str, float] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype in dtypes:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            modes = (False, True) if on_cuda and dtype == torch.float32 else (False,)
            for allow in modes:
                torch.backends.cuda.matmul.allow_tf32 = allow
                seconds = _median_seconds(lambda: torch.matmul(a, b), device, repeats)
                name = str(dtype).replace("torch.", "") + ("-tf32" if allow else "")
                rates[name] = 2.0 * size**3 / seconds
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    source = torch.empty(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    seconds = _median_seconds(lambda: target.copy_(source), device, repeats)
    del source, target
    if on_cuda:
        torch.cuda.empty_cache()
    return Ceilings(str(device), rates, 2.0 * copy_bytes / seconds, size, copy_bytes)


def achieved_fraction(config: BenchConfig, dtype: torch.dtype, seconds: float,
                      ceilings: Ceilings, tf32: bool = False) -> float:
    """``floor / seconds`` for one measured meta-step (see the module docstring)."""
    floor = work(config, dtype).floor_seconds(ceilings.matmul_rate(dtype, tf32),
                                              ceilings.copy_bytes_per_s)
    return floor / seconds
