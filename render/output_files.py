"""Every file render writes (figures, viewer pages, analysis tables) is swapped in whole.

`write_atomically(path, write)` has `write(tmp)` fill a temporary file of its own in the target
folder (`.tmp-<random>`: two renders into one folder never share one, and a name that fits the
file system still fits with it), gives it the mode a
new file would get, and replaces `path` with it (`os.replace`); on any error the temporary file
goes. A reader sees the old file or the new one, never half of one. No fsync: figures and tables
are made again by rendering again (docs/reliability.md).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def unwritable_reason(folder: Path) -> str | None:
    """Make `folder` (and its parents) and create (and drop) a file in it: None when both work, else
    why not, in a few words (e.g. "<path> is a file, not a folder")."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        return f"{blocker} is a file, not a folder" if blocker is not None else error.strerror or str(error)
    return None


def _file_mode() -> int:
    """The mode a newly created file gets here (0o666 less the umask), read without changing the
    umask where Linux shows it (setting it to read it would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(temporary path)` and `os.replace`; returns `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    tmp = Path(name)
    try:
        os.fchmod(fd, _file_mode())  # mkstemp makes it 0o600
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
