"""Opening an HDF5 file for reading in bounded time, with one-line errors (no capture layout here).

A capture still being written, or whose writer died, carries "open for writing" flags
in its superblock; HDF5 then refuses a plain read and only a single-writer/multiple-reader
(SWMR) read opens it. An SWMR read retries failed metadata reads for minutes (it takes
them for a writer caught mid-write), so it is tried only where it can succeed: the file
starts with a version-3 superblock whose flags say a writer had it open, and is at least
as long as that superblock says. Anything else gets the plain open's error at once.
Needs h5py only.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import h5py

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_WRITE_ACCESS, _SWMR_WRITE_ACCESS = 0x01, 0x04


class OpenError(Exception):
    """The file cannot be opened; the message is one line (without the path)."""


class NewerFormatError(OpenError):
    """The file uses HDF5 features newer than the HDF5 this h5py was built with."""


def library_versions() -> str:
    """'h5py 3.10.0 with HDF5 1.14.2'."""
    return f"h5py {h5py.version.version} with HDF5 {h5py.version.hdf5_version}"


def newer_format_message() -> str:
    return (f"was written by a newer HDF5 than this reader's ({library_versions()}); upgrade h5py "
            "(pip install -U h5py) to read it")


def is_version_error(error: BaseException) -> bool:
    """Whether an h5py error says an object uses a format version this HDF5 does not know."""
    text = str(error).lower()
    return "version" in text and ("bad" in text or "unknown" in text or "not supported" in text)


def superblock(path: Path) -> tuple[int, int, int] | None:
    """(version, consistency flags, end-of-file address) of the superblock at offset 0, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(96)
    except OSError:
        return None
    return parse_superblock(head)


def parse_superblock(head: bytes) -> tuple[int, int, int] | None:
    """`superblock` of a file's first 96 bytes."""
    if not head.startswith(SIGNATURE) or len(head) < 16:
        return None
    version = head[8]
    if version in (0, 1):
        size, base_at, flags = head[13], (24 if version == 0 else 28), int.from_bytes(head[20:24], "little")
    elif version in (2, 3):
        size, base_at, flags = head[9], 12, head[11]
    else:
        return version, 0, -1
    if size not in (2, 4, 8) or len(head) < base_at + 3 * size:
        return None
    base = int.from_bytes(head[base_at:base_at + size], "little")
    return version, flags, base + int.from_bytes(head[base_at + 2 * size:base_at + 3 * size], "little")


def open_read_only(path: Path) -> h5py.File:
    """Open `path` read-only, in SWMR mode when a writer had it open; raise OpenError in one line."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise OpenError(error.strerror or str(error)) from None
    if not stat.S_ISREG(mode):
        raise OpenError("is not a regular file")  # a FIFO or device would block or never end
    with open(path, "rb") as f:
        start = f.read(len(SIGNATURE))
    if start != SIGNATURE and not h5py.is_hdf5(path):
        raise OpenError("is not an HDF5 file")
    head = superblock(path)
    if head is not None and head[0] > 3:
        raise NewerFormatError(newer_format_message() + f" (superblock version {head[0]})")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        plain_error = error
    if is_version_error(plain_error):
        raise NewerFormatError(newer_format_message())
    if head is None or head[0] < 3 or not head[1] & (_WRITE_ACCESS | _SWMR_WRITE_ACCESS):
        raise OpenError(f"is damaged or truncated ({_short(plain_error)})")
    _wait_for_length(path, head[2])
    try:
        return h5py.File(path, "r", swmr=True)
    except OSError as error:
        if is_version_error(error):
            raise NewerFormatError(newer_format_message()) from None
        raise OpenError(f"is damaged or truncated ({_short(plain_error)})") from None


def _wait_for_length(path: Path, stored_eof: int) -> None:
    """Refuse a file shorter than its superblock says (an SWMR read of it retries for minutes).

    A live writer can extend the file a moment after its superblock, so a short file is
    looked at again, for about a second, before it is refused.
    """
    for attempt in range(5):
        size = path.stat().st_size
        if size >= stored_eof:
            return
        if attempt == 4:
            raise OpenError(f"is truncated ({size:,} of {stored_eof:,} bytes)")
        time.sleep(0.25)
        head = superblock(path)
        stored_eof = head[2] if head is not None else stored_eof


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]
