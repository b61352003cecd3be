"""The wheel: `pip wheel --no-build-isolation --no-deps .` from a clean copy of the tree, installed
into a fresh virtual environment beside the torch it was built against, runs there.

Slow (a compile, a venv and a torch install): `make test-wheel`. The copy of the tree and its
build folder stay in build/wheel-test/, so a second run recompiles only what changed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
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


def test_installed_wheel_refuses_another_torch(venv, tmp_path):
    result = subprocess.run(
        [venv / "bin" / "python", "-c",
         "import torch; torch.__version__ = '2.99.0'; import metakernels"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"was built against torch {torch.__version__}, but torch 2.99.0 is installed" \
        in result.stderr, result.stderr
