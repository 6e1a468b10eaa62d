"""Output folders checked before any work: a run that cannot write its outputs says so in one line
before it loads a model, not after solving."""

from __future__ import annotations

from pathlib import Path

from render.output_files import unwritable_reason


def writable_folder(folder: str | Path, what: str) -> Path:
    """Make `folder` (and its parents) and create (and drop) a file in it; ValueError with one line
    naming `what` (e.g. "--output_dir") if either fails."""
    folder = Path(folder)
    reason = unwritable_reason(folder)
    if reason is not None:
        raise ValueError(f"cannot write to {what} {folder}: {reason}")
    return folder
