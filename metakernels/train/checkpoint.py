"""Checkpoints written atomically: a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash or Ctrl-C during a save leaves the previous checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state, path)``, all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's file is private (0600); a checkpoint gets the permissions of any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save_atomic` (tensors and plain Python values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_for_resume(path: str | os.PathLike, resume: bool) -> dict | None:
    """The checkpoint at ``path`` to continue from with ``resume``, else None. ValueError if
    ``resume`` finds no checkpoint, or if a checkpoint is there without ``resume`` (a run would
    overwrite another)."""
    path = Path(path)
    if resume:
        if not path.exists():
            raise ValueError(f"--resume: there is no {path.name} in {path.parent} to continue "
                             "from")
        return load(path)
    if path.exists():
        raise ValueError(f"{path.parent} already holds a run ({path.name}); pass --resume to "
                         "continue it, or choose another --out")
    return None
