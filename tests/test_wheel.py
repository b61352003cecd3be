"""The wheel: `pip wheel --no-build-isolation --no-deps .` from a clean copy of the tree, installed
into a fresh virtual environment beside the torch it was built against (no extra), runs there;
then the user's journey through the README's commands in that environment, bare and then with
the `train` extra (test_journey_*).

Slow (a compile, a venv and a torch install): `make test-wheel`. The copy of the tree and its
build folder stay in build/wheel-test/, so a second run recompiles only what changed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

import pytest
import torch

import metakernels
from metakernels import _compat

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "wheel-test"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    """``command``, failing the test with its output where it fails."""
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                            timeout=900, **kwargs)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n" \
                                   f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def source_files() -> list[str]:
    """The files of the tree that git keeps: tracked ones, and new ones it does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the clean tree to build from is unknown")
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 cwd=ROOT).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def clean_copy() -> pathlib.Path:
    """The tree's files in build/wheel-test/src with their times (so ninja knows what it
    compiled), beside the build/temp.* objects of the last run; nothing else."""
    source = WORK / "src"
    if source.exists():
        for entry in source.iterdir():
            if entry.name != "build":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in (source / "build").glob("*"):
            if not entry.name.startswith("temp."):  # build/lib.*: last run's package files
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    return source


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", ".",
         "-w", out], cwd=clean_copy())
    (built,) = out.glob("metakernels-*.whl")
    return built


def clean_env() -> dict:
    """This process's environment without what would import the source tree or this venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", _compat.DISABLE_ENV)}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def scratch_dir(tmp_path_factory) -> pathlib.Path:
    """A folder for the venv: in memory where the machine has room there. The venv is 25,000
    files; on this machine's disk making them and removing them takes minutes."""
    shm = pathlib.Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30:
        return pathlib.Path(tempfile.mkdtemp(prefix="metakernels-wheel-venv-", dir=shm))
    return tmp_path_factory.mktemp("venv")


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment with the torch of this process and the wheel (and its other
    dependencies) installed."""
    root = scratch_dir(tmp_path_factory)
    run([sys.executable, "-m", "venv", root])
    pip = [root / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # The exact build (2.13.0+cpu here), which this machine has on disk.
    run([*pip, f"torch=={torch.__version__}"], env=clean_env())
    run([*pip, wheel], env=clean_env())
    yield root
    shutil.rmtree(root, ignore_errors=True)


def names(wheel: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def read(wheel: pathlib.Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode()


def test_wheel_holds_the_package_and_its_extension(wheel):
    files = names(wheel)
    package = [name for name in source_files() if name.startswith("metakernels/")]
    assert package and not set(package) - set(files), set(package) - set(files)
    assert any(name.startswith("metakernels/_C.") and name.endswith(".so") for name in files)
    # The reference pages the docstrings cite travel with the code (docs/README.md).
    pages = [name for name in source_files() if name.startswith("docs/") and name.endswith(".md")]
    assert pages and not {f"metakernels/{page}" for page in pages} - set(files), pages
    # torch here is a CPU build: no CUDA extension.
    assert torch.version.cuda is not None or not any("_C_cuda." in n and n.endswith(".so")
                                                     for n in files)
    dist_info = f"metakernels-{metakernels.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in files
    assert read(wheel, f"{dist_info}/licenses/LICENSE").startswith(
        "\n                                 Apache License\n                           Version 2.0")
    assert not [name for name in files
                if not name.startswith(("metakernels/", f"{dist_info}/"))], files
    facts = {}
    exec(read(wheel, "metakernels/_build_info.py"), facts)
    assert facts["VERSION"] == metakernels.__version__
    assert facts["TORCH_VERSION"] == str(torch.__version__)
    assert facts["TORCH_CUDA_VERSION"] == torch.version.cuda
    assert facts["CPU_ARCH"] == os.environ.get("METAKERNELS_CPU_ARCH", "native")
    assert _compat.cpu_problem(type("Info", (), facts), _compat.host_cpu_features()) is None


def test_wheel_metadata_pins_the_torch_it_was_built_against(wheel):
    metadata = read(wheel, f"metakernels-{metakernels.__version__}.dist-info/METADATA")
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires == [f"torch=={_compat.torch_release(torch.__version__)}", "numpy", "tqdm"], \
        requires
    assert f"Version: {metakernels.__version__}" in metadata
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines()
              if line.startswith("Provides-Extra:")}
    assert extras == {"train", "bench", "test", "all"}, extras
    assert 'Requires-Dist: transformers<6,>=5; extra == "train"' in metadata
    assert 'Requires-Dist: metakernels[bench,test,train]; extra == "all"' in metadata
    assert "License-Expression: Apache-2.0" in metadata


SMOKE = """
    import pathlib, sys
    import torch
    import metakernels as mk
    assert pathlib.Path(mk.__file__).is_relative_to(sys.prefix), (mk.__file__, sys.prefix)
    assert mk.available_backends("cpu") == ["cpu", "reference"], mk.available_backends("cpu")
    gen = torch.Generator().manual_seed(0)
    B, T, n, d_in, d_out = 3, 4, 7, 5, 6
    inputs = dict(weight=torch.randn(d_in, d_out, dtype=torch.float64, generator=gen),
                  x=torch.randn(B, n, d_in, dtype=torch.float64, generator=gen),
                  y=torch.randint(0, d_out, (B, n), generator=gen),
                  bias=torch.randn(d_out, dtype=torch.float64, generator=gen),
                  queries=torch.randn(B, T, 2, d_in, dtype=torch.float64, generator=gen))
    grads = {}
    for backend in ("cpu", "reference"):
        leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        out = mk.fast_weight_unroll(leaves["weight"], leaves["x"], leaves["y"], 0.3, steps=T,
                                    loss="ce", bias=leaves["bias"], queries=leaves["queries"],
                                    backend=backend)
        (out.readout.square().sum() + out.weight.sum()).backward()
        grads[backend] = [out.weight, out.readout] + [
            leaves[k].grad for k in ("weight", "x", "bias", "queries")]
    for fused, ref in zip(grads["cpu"], grads["reference"]):
        err = ((fused - ref).norm() / ref.norm()).item()
        assert err < 1e-10, err
    print("smoke ok")
"""


def test_wheel_runs_in_a_fresh_venv(venv, tmp_path):
    python = venv / "bin" / "python"
    installed = run([python, "-c", "import torch; print(torch.__version__)"], cwd=tmp_path,
                    env=clean_env()).stdout.strip()
    assert installed == str(torch.__version__)  # installing the wheel kept that torch
    smoke = run([python, "-c", textwrap.dedent(SMOKE)], cwd=tmp_path, env=clean_env())
    assert "smoke ok" in smoke.stdout
    version = run([venv / "bin" / "metakernels", "--version"], cwd=tmp_path, env=clean_env())
    lines = version.stdout.splitlines()
    assert lines[0] == f"metakernels {metakernels.__version__}"
    assert lines[1].startswith(f"built against torch {torch.__version__} ")
    assert "cpu tensors: cpu, reference" in lines[2]


def test_installed_wheel_beside_another_torch_runs_without_its_kernels(venv, tmp_path):
    """Beside another torch release the import works, the compiled backends are left out, and
    asking for one raises the reason, naming the torch the wheel was built for."""
    result = subprocess.run(
        [venv / "bin" / "python", "-c", textwrap.dedent("""
            import sys, torch
            torch.__version__ = '2.99.0'
            import metakernels as mk
            assert "metakernels._C" not in sys.modules
            assert mk.available_backends("cpu") == ["reference"], mk.available_backends("cpu")
            x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
            mk.fast_weight_unroll(torch.zeros(3, 4), x, y, 0.1, steps=2)
            mk.fast_weight_unroll(torch.zeros(3, 4), x, y, 0.1, steps=2, backend="cpu")
            """)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "RuntimeError: backend 'cpu' is not available" in result.stderr, result.stderr
    assert f"was built against torch {torch.__version__}, but torch 2.99.0 is installed" \
        in result.stderr, result.stderr


# --- The user's journey (README): each command a user reads, in the bare install, then with
# the `train` extra. Sizes are cut to seconds; what each command writes is checked.

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BARE_ONE_LINE = re.compile(r"^metakernels \w+: .* needs .*, which (is|are) not installed: "
                           r"pip install 'metakernels\[(train|bench)\]'$")
# A few meta-steps, tasks and held-out tasks: the command as the README gives it, smaller.
SMALL_TRAIN = ["--steps", "4", "--meta-batch", "4", "--eval-tasks", "8", "--log-every", "1",
               "--no-progress"]


def metakernels_command(venv: pathlib.Path, args: list, cwd: pathlib.Path,
                        expect: int = 0) -> subprocess.CompletedProcess:
    began = time.perf_counter()
    result = subprocess.run([venv / "bin" / "metakernels", *map(str, args)], cwd=cwd,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    # Each command's time, in the test's output (pytest -rP shows it).
    print(f"{time.perf_counter() - began:6.1f} s  metakernels {shlex.join(map(str, args))}")
    assert result.returncode == expect, f"metakernels {args} exited {result.returncode}:\n" \
                                        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def importable(venv: pathlib.Path, module: str, cwd: pathlib.Path) -> bool:
    return subprocess.run([venv / "bin" / "python", "-c", f"import {module}"], cwd=cwd,
                          env=clean_env(), capture_output=True, timeout=300).returncode == 0


def check_run(out: pathlib.Path, task: str, steps: int, plot: bool) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["steps"]) == (task, steps)
    assert all(math.isfinite(v) for v in summary["eval"].values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert (out / "checkpoint.pt").stat().st_size > 0
    assert (out / "curves.png").exists() == plot
    if plot:
        assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    return summary


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> pathlib.Path:
    """The user's working folder, shared by the bare and the `train` steps."""
    return tmp_path_factory.mktemp("journey")


def test_journey_bare_install(venv, journey):
    """`pip install metakernels` alone: version, demo, train (sinusoid, fewshot), bench; the
    commands that need an extra say which, in one line."""
    for module in ("matplotlib", "transformers"):
        assert not importable(venv, module, journey), f"{module} is in the bare venv"
    version = metakernels_command(venv, ["--version"], journey).stdout
    assert version.startswith(f"metakernels {metakernels.__version__}\n")

    # --no-memory: the peak-memory column (a child process per contestant) made the demo take
    # 119 s here against 15-26 s without it (2 loaded cores); tests/test_demo.py covers it.
    demo = metakernels_command(venv, ["demo", "--quick", "--no-memory", "--json", "demo.json"],
                               journey)
    assert "PASS: 0 failure(s)" in demo.stdout, demo.stdout
    demo_records = json.loads((journey / "demo.json").read_text())
    assert {r["config"] for r in demo_records["results"]} == {"maml-small", "maml-ce"}
    timed = {(r["config"], r["contestant"]) for r in demo_records["results"]
             if r["agrees"] and r["median_ms"] > 0}
    assert {("maml-small", "metakernels:cpu"), ("maml-ce", "metakernels:cpu"),
            ("maml-small", "torch.func")} <= timed, demo_records["results"]
    assert all(c["passed"] for c in demo_records["backend_checks"])

    for task in ("sinusoid", "fewshot"):
        out = journey / "runs" / task
        result = metakernels_command(venv, ["train", "--task", task, "--algo", "anil",
                                            *SMALL_TRAIN, "--out", out], journey)
        check_run(out, task, 4, plot=False)
        assert json.loads(result.stdout)["task"] == task
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("curves.png not drawn: it needs "
                                                       "matplotlib (pip install "
                                                       "'metakernels[train]')"), result.stderr

    bench = metakernels_command(venv, ["bench", "--quick", "--config", "maml-small",
                                       "--json", "bench.json"], journey)
    records = json.loads((journey / "bench.json").read_text())
    assert records and {r["config"] for r in records} == {"maml-small"}, bench.stdout
    for record in records:
        assert (record["tasks"], record["scaled_from"]) == (16, {"tasks": 64})
        assert record["ratio"] > 0 and record["sweep"] is None
    assert "higher is not installed (pip install 'metakernels[bench]')" in bench.stdout

    for args in (["train", "--task", "reasoning", *SMALL_TRAIN, "--out", "runs/reasoning"],
                 ["bench", "--quick", "--sweeps-only", "--plot", "plots"],
                 ["analyze", "trajectory-loss", "--run", "runs/sinusoid"]):
        refused = metakernels_command(venv, args, journey, expect=2)
        assert BARE_ONE_LINE.match(refused.stderr.strip()), (args, refused.stderr)
        assert refused.stdout == ""
    assert not (journey / "runs" / "reasoning").exists() and not (journey / "plots").exists()


def test_journey_with_the_train_extra(venv, wheel, journey):
    """`pip install 'metakernels[train]'` in the same environment keeps its torch; then the
    reasoning task, its analysis and the plots."""
    began = time.perf_counter()
    # --no-compile: no bytecode for transformers' thousands of files up front (80 s with it,
    # 19 s without, on this 2-core machine at load 6-7); what runs is compiled when imported.
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile",
         "--disable-pip-version-check", f"{wheel}[train]"], env=clean_env())
    print(f"{time.perf_counter() - began:6.1f} s  pip install '{wheel.name}[train]'")
    installed = run([venv / "bin" / "python", "-c", "import torch; print(torch.__version__)"],
                    cwd=journey, env=clean_env()).stdout.strip()
    assert installed == str(torch.__version__)   # the pin held: no other torch came with it

    sinusoid = journey / "runs" / "sinusoid"
    if (sinusoid / "checkpoint.pt").exists():   # the bare step ran: the command it gave draws
        metakernels_command(venv, ["train", "--task", "sinusoid", "--algo", "anil", "--steps",
                                   "4", "--out", sinusoid, "--resume", "--no-progress"], journey)
        check_run(sinusoid, "sinusoid", 4, plot=True)

    out = journey / "runs" / "reasoning-train"
    result = metakernels_command(venv, ["train", "--task", "reasoning", "--algo", "maml",
                                        "--trajectory-length", "2", *SMALL_TRAIN, "--out", out],
                                 journey)
    summary = check_run(out, "reasoning", 4, plot=True)
    assert 0 <= summary["eval"]["query_accuracy_after_adapt"] <= 1
    assert "reasoning task's transformer: attention sdpa (" in result.stderr, result.stderr

    analysis = metakernels_command(venv, ["analyze", "trajectory-loss", "--run", out,
                                          "--questions", "20"], journey)
    assert (out / "trajectory_loss.png").read_bytes()[:8] == PNG_MAGIC
    curves = json.loads((out / "trajectory_loss.json").read_text())
    assert {name: len(curve) for name, curve in curves.items()} == {"correct": 3,
                                                                    "corrupted": 3}
    assert f"drawn to {out / 'trajectory_loss.png'}" in analysis.stdout
