"""The house of README.md's Layout section, as imports: each layer imports only the layers below
it, and no two modules import each other (at module level or inside a function). Read from the
source with ast; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metakernels"

# What each part of the package must never import (README.md, Layout).
FORBIDDEN = {
    "metakernels.reference": ("metakernels.ops", "metakernels.triton", "metakernels.nn",
                              "metakernels.train", "metakernels.benchmarks",
                              "metakernels.analysis", "metakernels.cli"),
    # The kernels know nothing of the dispatch layer above them.
    "metakernels.triton": ("metakernels.ops", "metakernels.nn", "metakernels.train",
                           "metakernels.benchmarks", "metakernels.analysis", "metakernels.cli"),
    "metakernels.ops": ("metakernels.nn", "metakernels.train", "metakernels.benchmarks",
                        "metakernels.analysis", "metakernels.cli"),
    "metakernels.nn": ("metakernels.train", "metakernels.benchmarks", "metakernels.analysis",
                       "metakernels.cli"),
    # The trainer and the benchmark harness are neighbours: neither builds on the other. The
    # analysis tools sit below the trainer, which measures its runs with them (walk_lm).
    "metakernels.train": ("metakernels.benchmarks", "metakernels.cli"),
    "metakernels.benchmarks": ("metakernels.train", "metakernels.analysis", "metakernels.cli"),
    # The analysis tools measure any causal LM: they need none of the kernels' layers.
    "metakernels.analysis": ("metakernels.reference", "metakernels.triton", "metakernels.ops",
                             "metakernels.nn", "metakernels.train", "metakernels.benchmarks",
                             "metakernels.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The metakernels modules ``path`` imports anywhere in it: ``from package import name`` is
    the submodule ``package.name`` where there is one, else the package."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name.split(".")[0] == "metakernels"}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def within(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def test_the_graph_sees_the_imports():
    edges = graph()
    assert "metakernels.ops.fast_weight_unroll" in edges["metakernels.nn.fast_weight_memory"] \
        or "metakernels.ops" in edges["metakernels.nn.fast_weight_memory"]
    assert "metakernels.train.cli" in edges["metakernels.cli"]
    assert "metakernels.benchmarks.peers" in edges["metakernels.benchmarks.contestants"]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(part):
    crossed = sorted(f"{name} imports {target}" for name, targets in graph().items()
                     if within(name, part) for target in targets
                     if any(within(target, above) for above in FORBIDDEN[part]))
    assert not crossed, crossed


def test_the_modules_below_everything_import_only_one_another():
    """metakernels/_*.py (losses, extras, argparse types, the attention choice, the torch and
    CPU checks): every other part may import them, so they import none of it."""
    edges = graph()
    bottom = {name for name in edges if name.count(".") == 1 and name.split(".")[1][0] == "_"
              and name != "metakernels.__main__"}
    assert {"metakernels._losses", "metakernels._extras", "metakernels._compat"} <= bottom
    crossed = sorted(f"{name} imports {target}" for name in bottom for target in edges[name]
                     if target not in bottom)
    assert not crossed, crossed


def test_no_two_modules_import_each_other():
    """Leaving out a package's ``__init__`` importing its own modules, which Python allows for
    the names it re-exports."""
    edges = graph()
    pairs = sorted(f"{a} <-> {b}" for a, targets in edges.items() for b in targets
                   if a < b and a in edges.get(b, ()) and not within(a, b) and not within(b, a))
    assert not pairs, pairs
