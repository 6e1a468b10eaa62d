"""Output folders checked before any work: a run that cannot write its outputs says so in one line
before it loads a model, not after solving."""

from __future__ import annotations

import tempfile
from pathlib import Path


def writable_folder(folder: str | Path, what: str) -> Path:
    """Make `folder` (and its parents) and create (and drop) a file in it; ValueError with one line
    naming `what` (e.g. "--output_dir") if either fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else error.strerror or str(error)
        raise ValueError(f"cannot write to {what} {folder}: {reason}") from None
    return folder
