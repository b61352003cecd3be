"""The MLP fast-weight benchmarks (docs/ops/fast_weight_mlp.md): ``maml-sinusoid`` and
``ttt-mlp``, forward + backward of the whole second-order meta-step, every contestant after the
same float64 meta-gradient check, timed interleaved in one process, with peak memory.

Contestants (each returns the meta-gradient of the summed outer loss in every layer's weight and
bias, a list like ``problem.params``):

- ``metakernels:<backend>+loss``: :func:`metakernels.fast_weight_mlp_meta_loss` (``+ckpt``: with
  ``checkpoint=True``).
- ``torch.func``: ``vmap`` over tasks of a differentiable unrolled loop whose inner gradient is
  ``torch.func.grad``, differentiated by ``torch.func.grad``.
- ``autograd-loop``: the loop on all tasks at once (batched matmuls), the inner gradient by
  ``torch.autograd.grad(create_graph=True)``, then the outer backward.
- ``torchopt``: ``torchopt.MetaSGD`` on an ``nn.Module`` per task (where torchopt installs).
- ``higher``: ``higher.innerloop_ctx`` per task (where higher installs).

    python -m metakernels bench --config maml-sinusoid --config ttt-mlp --threads 1
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import metakernels
from metakernels._losses import mean_loss
from metakernels.benchmarks import memory, timing
from metakernels.reference.fast_weight_mlp import activate


@dataclass(frozen=True)
class MlpBenchConfig:
    """One MLP configuration: B tasks, T steps, n support rows (per step with ``x_per_step``),
    the widths and activation, the query rows m (form A: one query set; form B: a readout loss
    every step), a scalar inner lr, shared init with biases."""

    name: str
    tasks: int
    steps: int
    support: int
    widths: tuple
    activation: str
    x_per_step: bool
    queries: int
    form: str
    inner_lr: float

    def describe(self) -> str:
        layout = "4-D x" if self.x_per_step else "3-D x"
        return (f"B={self.tasks} T={self.steps} ({layout}) n={self.support} "
                f"{' -> '.join(map(str, self.widths))} {self.activation}, mse, shared init, "
                f"biases, scalar lr {self.inner_lr:g}, query form {self.form} m={self.queries}")

    def flops(self) -> float:
        """FLOPs of the essential work of one meta-step (multiply-adds × 2): per step and task,
        the forward's 3 products of the n support rows with every layer (A, G, ΔWᵀ) plus the
        backward's 6 (tangent and its reverse), and the query rows' forward and backward
        (4 products) at every readout."""
        layer_macs = sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:]))
        per_step = 9 * self.support * layer_macs
        readouts = self.steps if self.form == "B" else 1
        total = self.tasks * (self.steps * per_step + readouts * 4 * self.queries * layer_macs)
        return 2.0 * total


MLP_CONFIGS: dict[str, MlpBenchConfig] = {c.name: c for c in (
    MlpBenchConfig("maml-sinusoid", tasks=25, steps=5, support=10, widths=(1, 40, 40, 1),
                   activation="relu", x_per_step=False, queries=10, form="A", inner_lr=0.01),
    MlpBenchConfig("ttt-mlp", tasks=16, steps=64, support=16, widths=(64, 256, 64),
                   activation="gelu", x_per_step=True, queries=16, form="B", inner_lr=0.1),
)}


def quick_config(config: MlpBenchConfig) -> MlpBenchConfig:
    """A smaller version for smoke runs."""
    if config.name == "ttt-mlp":
        return dataclasses.replace(config, tasks=4, steps=8, widths=(16, 32, 16))
    return config


@dataclass
class MlpProblem:
    config: MlpBenchConfig
    params: list      # [W_0, b_0, W_1, b_1, ...], shared, requires grad
    x: Tensor
    y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def weights(self) -> list:
        return self.params[0::2]

    @property
    def biases(self) -> list:
        return self.params[1::2]


def make_problem(config: MlpBenchConfig, dtype=torch.float32, seed: int = 0) -> MlpProblem:
    gen = torch.Generator().manual_seed(seed)
    B, T, n, m, w = config.tasks, config.steps, config.support, config.queries, config.widths

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    params = []
    for d_in, d_out in zip(w[:-1], w[1:]):
        params.append(randn(d_in, d_out, scale=d_in ** -0.5).requires_grad_())
        params.append(randn(d_out, scale=0.1).requires_grad_())
    lead = (B, T, n) if config.x_per_step else (B, n)
    qlead = (B, T, m) if config.form == "B" else (B, m)
    return MlpProblem(config, params, randn(*lead, w[0]), randn(*lead, w[-1]),
                      randn(*qlead, w[0]), randn(*qlead, w[-1]))


def _net(params: list, inputs: Tensor, activation: str) -> Tensor:
    """The MLP on ``inputs [..., rows, d_0]`` with layers whose leading dims broadcast."""
    hidden = inputs
    layers = len(params) // 2
    for l in range(layers):
        hidden = hidden @ params[2 * l] + params[2 * l + 1].unsqueeze(-2)
        if l + 1 < layers:
            hidden = activate(hidden, activation)
    return hidden


def _unrolled_meta_loss(fast: list, x, y, qx, qy, config: MlpBenchConfig,
                        inner_grad: Callable) -> Tensor:
    """The outer loss after T differentiable steps, with or without a leading task dim."""
    total = 0.0
    for t in range(config.steps):
        x_t = x.select(-3, t) if config.x_per_step else x
        y_t = y.select(-3, t) if config.x_per_step else y
        grads = inner_grad(fast, x_t, y_t)
        fast = [p - config.inner_lr * g for p, g in zip(fast, grads)]
        if config.form == "B":
            total = total + mean_loss(_net(fast, qx.select(-3, t), config.activation),
                                      qy.select(-3, t), "mse")
    if config.form == "A":
        total = mean_loss(_net(fast, qx, config.activation), qy, "mse")
    return total


def metakernels_contestant(backend: str, checkpoint: bool = False):
    def run(problem: MlpProblem) -> list:
        c = problem.config
        loss = metakernels.fast_weight_mlp_meta_loss(
            problem.weights, problem.biases, problem.x, problem.y, c.inner_lr, problem.query_x,
            problem.query_y, steps=None if c.x_per_step else c.steps, activation=c.activation,
            reduction="sum", checkpoint=checkpoint, backend=backend)
        return list(torch.autograd.grad(loss, problem.params))
    return run


def torch_func_contestant(problem: MlpProblem) -> list:
    c = problem.config

    def inner_loss(fast, x_t, y_t):
        return mean_loss(_net(fast, x_t, c.activation), y_t, "mse")

    inner_grad = torch.func.grad(inner_loss)

    def one_task(params, x, y, qx, qy):
        return _unrolled_meta_loss(list(params), x, y, qx, qy, c, inner_grad)

    def total(params):
        per_task = torch.func.vmap(one_task, in_dims=(None, 0, 0, 0, 0))(
            params, problem.x, problem.y, problem.query_x, problem.query_y)
        return per_task.sum()

    return list(torch.func.grad(total)(tuple(p.detach() for p in problem.params)))


def autograd_loop_contestant(problem: MlpProblem) -> list:
    c = problem.config
    B = c.tasks
    fast = [p.expand(B, *p.shape) for p in problem.params]

    def inner_grad(fast, x_t, y_t):
        loss = mean_loss(_net(fast, x_t, c.activation), y_t, "mse")
        return torch.autograd.grad(loss, fast, create_graph=True)

    loss = _unrolled_meta_loss(fast, problem.x, problem.y, problem.query_x, problem.query_y, c,
                               inner_grad)
    return list(torch.autograd.grad(loss, problem.params))


def _module_for(config: MlpBenchConfig) -> torch.nn.Module:
    layers = []
    w = config.widths
    for l, (d_in, d_out) in enumerate(zip(w[:-1], w[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if l + 1 < len(w) - 1:
            layers.append({"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(),
                           "gelu": torch.nn.GELU(), "silu": torch.nn.SiLU()}[config.activation])
    return torch.nn.Sequential(*layers)


def _load_into(module: torch.nn.Module, params: list) -> None:
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for l, linear in enumerate(linears):
            linear.weight.copy_(params[2 * l].t())
            linear.bias.copy_(params[2 * l + 1])


def _module_grads(module: torch.nn.Module) -> list:
    out = []
    for linear in (m for m in module if isinstance(m, torch.nn.Linear)):
        out += [linear.weight.grad.t().clone(), linear.bias.grad.clone()]
    return out


def _task_slices(problem: MlpProblem, b: int):
    return problem.x[b], problem.y[b], problem.query_x[b], problem.query_y[b]


def torchopt_contestant(problem: MlpProblem) -> list:
    """torchopt's MetaSGD (differentiable SGD) over an nn.Module, one task at a time."""
    import torchopt
    c = problem.config
    module = _module_for(c).to(problem.x.dtype)
    _load_into(module, [p.detach() for p in problem.params])
    module.zero_grad()
    for b in range(c.tasks):
        x, y, qx, qy = _task_slices(problem, b)
        optimizer = torchopt.MetaSGD(module, lr=c.inner_lr)
        state = torchopt.extract_state_dict(module)
        total = 0.0
        for t in range(c.steps):
            x_t, y_t = (x[t], y[t]) if c.x_per_step else (x, y)
            optimizer.step(mean_loss(module(x_t), y_t, "mse"))
            if c.form == "B":
                total = total + mean_loss(module(qx[t]), qy[t], "mse")
        if c.form == "A":
            total = mean_loss(module(qx), qy, "mse")
        total.backward()
        torchopt.recover_state_dict(module, state)
    return _module_grads(module)


def higher_contestant(problem: MlpProblem) -> list:
    """higher's innerloop_ctx (a functional copy of the module), one task at a time."""
    import higher
    c = problem.config
    module = _module_for(c).to(problem.x.dtype)
    _load_into(module, [p.detach() for p in problem.params])
    module.zero_grad()
    inner_opt = torch.optim.SGD(module.parameters(), lr=c.inner_lr)
    for b in range(c.tasks):
        x, y, qx, qy = _task_slices(problem, b)
        with higher.innerloop_ctx(module, inner_opt,
                                  copy_initial_weights=False) as (fmodel, diffopt):
            total = 0.0
            for t in range(c.steps):
                x_t, y_t = (x[t], y[t]) if c.x_per_step else (x, y)
                diffopt.step(mean_loss(fmodel(x_t), y_t, "mse"))
                if c.form == "B":
                    total = total + mean_loss(fmodel(qx[t]), qy[t], "mse")
            if c.form == "A":
                total = mean_loss(fmodel(qx), qy, "mse")
            total.backward()
    return _module_grads(module)


def _peer_available(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def contestants(backends: list[str] | None = None, peers: bool = True) -> dict[str, Callable]:
    """Every contestant that can run here: the metakernels backends with MLP kernels (the cpu
    one, and its checkpointed form), the reference, the baselines and the installed peers."""
    names = backends or [b for b in metakernels.available_backends("cpu") if b != "reference"]
    out = {}
    for backend in names:
        if backend == "cpu":
            out["metakernels:cpu+loss"] = metakernels_contestant("cpu")
            out["metakernels:cpu+loss+ckpt"] = metakernels_contestant("cpu", checkpoint=True)
    out["metakernels:reference"] = metakernels_contestant("reference")
    out["torch.func"] = torch_func_contestant
    out["autograd-loop"] = autograd_loop_contestant
    if peers and _peer_available("torchopt"):
        out["torchopt"] = torchopt_contestant
    if peers and _peer_available("higher"):
        out["higher"] = higher_contestant
    return out


def check(config: MlpBenchConfig, runs: dict[str, Callable], seed: int = 0) -> dict[str, float]:
    """Each contestant's float64 meta-gradient's relative error against the reference's."""
    problem = make_problem(config, torch.float64, seed)
    want = runs["metakernels:reference"](problem)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in want))
    errors = {}
    for name, run in runs.items():
        got = run(problem)
        diff = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, want)))
        errors[name] = float(diff / norm)
    return errors


def peak_memory_child(config_name: str, contestant: str, quick: bool) -> int | None:
    """The peak RSS increase of one meta-step of ``contestant`` (float32), measured in a fresh
    child process (memory.py's method: VmHWM reset after a warm-up step, median of 3)."""
    command = [sys.executable, "-m", "metakernels.benchmarks.mlp", "--memory", config_name,
               contestant] + (["--quick"] if quick else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    try:
        return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])
    except (ValueError, IndexError, KeyError):
        return None


def _memory_main(config_name: str, contestant: str, quick: bool) -> None:
    torch.set_num_threads(1)
    config = MLP_CONFIGS[config_name]
    if quick:
        config = quick_config(config)
    problem = make_problem(config)
    run = contestants()[contestant]
    run(problem)
    increases = []
    for _ in range(3):
        gc.collect()
        memory._release_free_heap()
        memory._reset_high_water_mark()
        before = memory._status_bytes("VmRSS")
        run(problem)
        increases.append(max(0, memory._status_bytes("VmHWM") - before))
    print(json.dumps({"peak_bytes": int(statistics.median(increases))}))


def run_config(name: str, *, quick: bool = False, repeats: int = 20, backends=None,
               measure_memory: bool = True, seed: int = 0, log=print) -> list[dict]:
    """Checks, times and (optionally) measures the memory of every contestant on one MLP
    configuration; returns one record per contestant."""
    config = MLP_CONFIGS[name]
    if quick:
        config = quick_config(config)
    runs = contestants(backends)
    log(f"\n== {name}: {config.describe()}")
    errors = check(config, runs, seed)
    ok = {k: v for k, v in errors.items() if v <= 1e-8}
    for k, v in errors.items():
        if k not in ok:
            log(f"  {k}: meta-gradient disagrees with the reference (rel err {v:.2e}); not timed")
    problem = make_problem(config, torch.float32, seed)
    slow = {"higher", "torchopt", "metakernels:reference"}
    counts = {k: max(3, repeats // 4) if k in slow else repeats for k in ok}
    # One torch thread: this thread's CPU time (time.thread_time), which a machine shared with
    # other jobs does not stretch; several: wall time.
    one_thread = torch.get_num_threads() == 1
    clock = time.thread_time if one_thread else time.perf_counter
    log(f"  timing: {'CPU time of the one thread' if one_thread else 'wall time'}, median of "
        f"{repeats} interleaved rounds ({max(3, repeats // 4)} for the slow peers)")
    samples = timing.time_interleaved({k: (lambda run=runs[k]: run(problem)) for k in ok},
                                      repeats=counts, warmup=2, clock=clock)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians.get("torch.func")
    flops = config.flops()
    records = []
    for k in runs:
        record = dict(config=name, contestant=k, rel_err_f64=errors[k],
                      agrees=k in ok, seconds=medians.get(k), gflops=None,
                      speedup_vs_torch_func=None, peak_bytes=None)
        if k in medians:
            record["gflops"] = flops / medians[k] / 1e9
            if base:
                record["speedup_vs_torch_func"] = base / medians[k]
        if measure_memory and k in ok:
            record["peak_bytes"] = peak_memory_child(name, k, quick)
        records.append(record)
    log(format_records(records))
    return records


def format_records(records: list[dict]) -> str:
    lines = ["| contestant | ms | × torch.func | GFLOP/s | peak MiB | f64 rel err |",
             "|---|---|---|---|---|---|"]
    for r in records:
        ms = f"{r['seconds'] * 1e3:.3f}" if r["seconds"] else "-"
        ratio = f"{r['speedup_vs_torch_func']:.2f}" if r["speedup_vs_torch_func"] else "-"
        gf = f"{r['gflops']:.2f}" if r["gflops"] else "-"
        mib = f"{r['peak_bytes'] / 2**20:.2f}" if r["peak_bytes"] is not None else "-"
        lines.append(f"| {r['contestant']} | {ms} | {ratio} | {gf} | {mib} | "
                     f"{r['rel_err_f64']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--memory":
        _memory_main(sys.argv[2], sys.argv[3], "--quick" in sys.argv)
