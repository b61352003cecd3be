"""The contract lives in the repository (docs/): no file cites a document the repository does not
contain, every public op has its reference page in docs/README.md's index, and the pages' own
links resolve."""

from __future__ import annotations

import inspect
import pathlib
import re
import shutil
import subprocess

import pytest

import metakernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A cited document: a path ending in .md, not part of a longer word or path.
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")
# A markdown link's target (before any #anchor).
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def tracked_files() -> list[pathlib.Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: which files the repository holds is unknown")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def text_of(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# Placeholders of a command line (``--out FILE.md``), not documents.
PLACEHOLDERS = {"FILE.md"}


def is_citation(cited: str, top_level: set[str]) -> bool:
    """A document this repository would hold: an upper-case name (README.md, CONTRIBUTING.md, ...) or a
    path under one of its own folders (docs/..., bench/results/...). Output files that commands
    are told to write (out.md, $OUT/report.md, FILE.md) are not citations."""
    parts = cited.split("/")
    if len(parts) == 1:
        return parts[0][:-3].isupper() and cited not in PLACEHOLDERS
    return parts[0] in top_level


def resolves(cited: str, citing: pathlib.Path) -> bool:
    return (ROOT / cited).is_file() or (citing.parent / cited).is_file()


def test_no_file_cites_a_document_the_repository_does_not_contain():
    files = tracked_files()
    top_level = {path.relative_to(ROOT).parts[0] for path in files
                 if len(path.relative_to(ROOT).parts) > 1}
    missing = []
    for path in files:
        if path == pathlib.Path(__file__).resolve():
            continue  # this file names missing documents on purpose, to test the checker
        text = text_of(path)
        if text is None:
            continue
        for cited in sorted(set(CITED.findall(text))):
            if is_citation(cited, top_level) and not resolves(cited, path):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)


def test_the_checker_sees_a_missing_document(tmp_path):
    citing = ROOT / "metakernels" / "__init__.py"
    top_level = {"docs", "metakernels"}
    assert "ELSEWHERE.md" in CITED.findall("The op contract is ELSEWHERE.md; see docs/ops/nothing.md.")
    assert is_citation("ELSEWHERE.md", top_level) and not resolves("ELSEWHERE.md", citing)
    assert is_citation("docs/ops/nothing.md", top_level)
    assert not resolves("docs/ops/nothing.md", citing)
    assert resolves("docs/ops/fast_weight_unroll.md", citing)
    assert not is_citation("out.md", top_level)  # an output file a command is told to write


def test_markdown_links_resolve():
    broken = []
    for page in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} links {target}")
    assert not broken, "\n".join(broken)


def public_ops() -> list[str]:
    return [name for name in metakernels.__all__
            if inspect.isfunction(getattr(metakernels, name)) and name != "available_backends"]


def test_every_public_op_has_its_page_in_the_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    listed = {}
    for line in index.splitlines():
        for target in LINK.findall(line):
            for name in re.findall(r"`(\w+)`", line):
                listed.setdefault(name, DOCS / target)
    assert public_ops()
    for name in public_ops():
        assert name in listed, f"docs/README.md does not list {name}"
        assert listed[name].is_file(), f"{name}'s page {listed[name]} is missing"
    for page in (DOCS / "ops").glob("*.md"):
        assert f"(ops/{page.name})" in index, f"docs/README.md does not list {page.name}"
