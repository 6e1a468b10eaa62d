"""One writer per capture: an exclusive lock on the sidecar `<capture>.lock` for the writer's lifetime.

The lock is `flock` on an open file, so the kernel drops it when the writer's process
dies in any way (`kill -9`, a lost node's process tree): a killed writer never leaves
a lock that blocks a rerun. The lock file holds `pid host` of the live writer, so a
second writer is refused in one line naming it. HDF5's own file lock cannot serve:
it is released once SWMR writing starts, which is for the whole run.

Locks are advisory and need a file system that implements `flock` (local disks do; on
NFS Linux maps it to POSIX locks). Where `fcntl` does not exist (Windows) no lock is
taken. Needs the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_SUFFIX = ".lock"


class CaptureLockedError(Exception):
    """Another live process writes the capture; the message is one line naming it."""


def lock_path(capture_file: str | os.PathLike) -> Path:
    """`captures/run.h5` -> `captures/run.h5.lock`."""
    capture_file = Path(capture_file)
    return capture_file.with_name(capture_file.name + LOCK_SUFFIX)


class WriterLock:
    """The held lock of one capture file; `release()` (idempotent) gives it up and removes the file."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, capture_file: str | os.PathLike, hint: str = "or pass another --capture_file") -> "WriterLock":
        """Take the lock of `capture_file` (any file a writer owns) or raise CaptureLockedError naming the
        live writer; `hint` ends the message."""
        path = lock_path(capture_file)
        if fcntl is None:
            return cls(path, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise CaptureLockedError(
                    f"{capture_file} is being written by another process ({holder}); wait for it to finish, "
                    f"{hint}") from None
            except OSError:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a deleted inode, and must lock the new file instead.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked, so no one locks the file we delete
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace")
    except OSError:
        text = ""
    text = "".join(ch for ch in text.strip() if ch.isprintable())
    return text or "pid unknown"
