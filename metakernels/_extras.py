"""What a bare ``pip install metakernels`` leaves out, and the one line that says so.

A bare install brings torch, numpy and tqdm: the ops, ``metakernels demo``, ``metakernels bench``
without its peers and plots, and ``metakernels train`` on the sinusoid and fewshot tasks without
its plot. The rest comes with an extra (pyproject.toml): ``train`` (matplotlib for the plots,
transformers for the reasoning task's transformer), ``bench`` (the peers, matplotlib,
pytest-benchmark), ``all``. A command that needs a missing one raises :class:`MissingExtra`,
which the command lines print as one line (no traceback) before exiting 2.
"""

from __future__ import annotations

import importlib.util

# The extra that brings each optional package a command may need.
EXTRA_OF = {"matplotlib": "train", "transformers": "train"}


class MissingExtra(ImportError):
    """A package that an extra of metakernels brings is not installed. Its message is one line
    that names the extra to install."""


def install_command(extra: str) -> str:
    return f"pip install 'metakernels[{extra}]'"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; not imported here)."""
    return importlib.util.find_spec(module) is not None


def require(what: str, *modules: str, extra: str | None = None) -> None:
    """Raises :class:`MissingExtra` when one of ``modules`` is not installed: ``what`` (e.g.
    ``"--task reasoning"``) needs it, and ``extra`` (by default the one that brings the first
    missing module) installs it."""
    missing = [module for module in modules if not installed(module)]
    if missing:
        extra = extra or EXTRA_OF[missing[0]]
        raise MissingExtra(f"{what} needs {' and '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: "
                           f"{install_command(extra)}")
