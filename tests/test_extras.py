"""What a bare install leaves out: each command that needs an extra stops with one line naming
it, ``metakernels train`` runs without matplotlib and leaves out only curves.png, and
requirements-dev.txt holds every package the extras name. The same in a real bare environment:
tests/test_wheel.py."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from metakernels import _extras
from metakernels.cli import main as metakernels_main

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def hide(monkeypatch):
    """The set of packages that metakernels sees as not installed (``hide.add("matplotlib")``)."""
    hidden: set[str] = set()
    real = _extras.installed
    monkeypatch.setattr(_extras, "installed", lambda module: module not in hidden and real(module))
    return hidden


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_requirements_dev_holds_every_extra():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from "
                                                     "Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    dev = {_canonical(Requirement(line).name)
           for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
           if line.strip() and not line.lstrip().startswith(("#", "-"))}
    assert set(extras) >= {"train", "bench", "all"}
    for extra, requirements in extras.items():
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue   # learn2learn: not on this Python
            if _canonical(requirement.name) == "metakernels":   # an extra that takes others in
                if extra == "all":
                    assert requirement.extras == set(extras) - {"all"}, requirement
                assert extra not in requirement.extras, requirement
                assert requirement.extras <= set(extras), requirement
                continue
            assert _canonical(requirement.name) in dev, f"[{extra}] {text}"


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("task", ["reasoning", "walk"])
def test_transformer_task_without_transformers_says_which_extra(task, hide, tmp_path, capsys):
    hide.add("transformers")
    out = tmp_path / "run"
    code = metakernels_main(["train", "--task", task, "--steps", "2", "--out", str(out),
                             "--no-progress"])
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line == (f"metakernels train: --task {task} needs transformers, which is not "
                    "installed: pip install 'metakernels[train]'")
    assert not out.exists()


def test_train_without_matplotlib_leaves_out_only_the_plot(hide, tmp_path, capsys):
    hide.add("matplotlib")
    out = tmp_path / "run"
    argv = ["train", "--task", "sinusoid", "--algo", "anil", "--steps", "3", "--out", str(out),
            "--meta-batch", "4", "--eval-tasks", "4", "--log-every", "1", "--no-progress"]
    assert metakernels_main(argv) == 0
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert json.loads(captured.out)["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl",
                                                     "summary.json"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert "curves.png not drawn: it needs matplotlib (pip install 'metakernels[train]')" in line
    # The command it gives draws the plot once matplotlib is there, and changes nothing else.
    command = shlex.split(re.search(r"`metakernels (.*)` draws it", line).group(1))
    summary = (out / "summary.json").read_text()
    hide.clear()
    assert metakernels_main(command + ["--no-progress"]) == 0
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "summary.json").read_text() == summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_bench_plot_without_matplotlib_says_which_extra(hide, tmp_path, capsys):
    hide.add("matplotlib")
    code = metakernels_main(["bench", "--quick", "--sweeps-only", "--plot", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    assert one_line(captured.err) == ("metakernels bench: --plot needs matplotlib, which is not "
                                      "installed: pip install 'metakernels[bench]'")
    assert "== " not in captured.out   # nothing ran


@pytest.mark.parametrize("missing", [("transformers",), ("matplotlib",),
                                     ("transformers", "matplotlib")])
def test_analyze_without_its_packages_says_which_extra(hide, tmp_path, capsys, missing):
    hide.update(missing)
    code = metakernels_main(["analyze", "trajectory-loss", "--run", str(tmp_path)])
    assert code == 2
    are = "is" if len(missing) == 1 else "are"
    assert one_line(capsys.readouterr().err) == (
        f"metakernels analyze: trajectory-loss needs "
        f"{' and '.join(missing)}, which {are} not installed: pip install 'metakernels[train]'")


def test_test_extra_holds_what_the_test_suite_imports_at_module_level():
    """`pip install '.[test]' && pytest` needs every third-party package that conftest.py and the
    test files import at module level (hypothesis among them) in the test extra or the bare
    install (torch, numpy, tqdm; packaging comes with pytest)."""
    import ast
    import sys

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from "
                                                     "Python 3.11")
    test_extra = {_canonical(Requirement(text).name) for text in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]}
    provided = test_extra | {"torch", "numpy", "tqdm", "packaging", "metakernels"}
    local = {path.stem for path in (ROOT / "tests").glob("*.py")} | {"tests", "bench"}
    missing = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.parse(path.read_text()).body:   # module level only
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                if _canonical(top) not in provided:
                    missing.add(f"{path.name}: {top}")
    assert "hypothesis" in test_extra
    assert not missing, sorted(missing)
