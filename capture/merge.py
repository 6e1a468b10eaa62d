"""Shard files of a capture written by several processes, and their merge into the run's one file.

A capture run under torchrun writes one shard per rank next to the run's capture file::

    captures/<run>.h5                      the merged capture (what render/info read)
    captures/<run>.h5.shards/rank-00000.h5 rank 0's problems, an ordinary capture file
    captures/<run>.h5.shards/rank-00001.h5 ...

At the end rank 0 copies every problem of the existing capture file (if any) and of all
shards, in problem-number order, into `<run>.h5.merge-tmp` with `CaptureWriter.copy_problems`
(whole row ranges per dataset and source, offsets remapped; no problem is decoded and
encoded again), swaps it in with `os.replace` and deletes the shards. The layout stays
defined in `capture.format` alone.
Needs h5py and numpy only (no torch).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .format import (
    CaptureBusy,
    CaptureError,
    CaptureReader,
    CaptureWriter,
    check_same_config,
    check_same_problems,
    sync_folder,
)
from .lock import CaptureLockedError, WriterLock

SHARD_DIR_SUFFIX = ".shards"
MERGE_TMP_SUFFIX = ".merge-tmp"
MERGE_BATCH = 64  # problems per commit while merging (the merged file is swapped in whole anyway)


def shard_dir(capture_file: str | os.PathLike) -> Path:
    """`captures/run.h5` -> `captures/run.h5.shards`."""
    capture_file = Path(capture_file)
    return capture_file.with_name(capture_file.name + SHARD_DIR_SUFFIX)


def shard_path(capture_file: str | os.PathLike, rank: int) -> Path:
    """Rank `rank`'s shard: `captures/run.h5.shards/rank-00003.h5`."""
    return shard_dir(capture_file) / f"rank-{rank:05d}.h5"


def shard_files(capture_file: str | os.PathLike) -> list[Path]:
    """The shards present, in rank order (a rerun with another world size may find more or fewer)."""
    folder = shard_dir(capture_file)
    return sorted(folder.glob("rank-*.h5")) if folder.is_dir() else []


def sources(capture_file: str | os.PathLike) -> list[Path]:
    """The capture file itself (when it exists), then every shard: where finished problems are."""
    capture_file = Path(capture_file)
    return ([capture_file] if capture_file.exists() else []) + shard_files(capture_file)


def completed_numbers(capture_file: str | os.PathLike, config: dict,
                      questions: dict[int, str] | None = None) -> set[int]:
    """Numbers of the problems committed in the capture file or any shard.

    Raises CaptureConfigMismatch when one of them was captured with another `config`, or
    holds a problem whose question differs from `questions` (number -> question, when
    given); CaptureError when one cannot be read.
    """
    return set(completed_problems(capture_file, config, questions))


def completed_problems(capture_file: str | os.PathLike, config: dict,
                       questions: dict[int, str] | None = None) -> dict[int, bool | None]:
    """Number -> `correct` of the problems committed in the capture file or any shard (the first place
    a problem is found wins, as in `merge`); refuses as `completed_numbers` does."""
    done: dict[int, bool | None] = {}
    for path in sources(capture_file):
        with CaptureReader(path) as reader:
            check_same_config(path, reader.config, config)
            if questions is not None:
                check_same_problems(path, reader.questions(), questions)
            for problem in reader.problems():
                done.setdefault(problem.number, problem.correct)
    return done


def remove_shards(capture_file: str | os.PathLike) -> None:
    """Delete the shard folder of `capture_file` (and a leftover merge temp file)."""
    shutil.rmtree(shard_dir(capture_file), ignore_errors=True)
    capture_file = Path(capture_file)
    capture_file.with_name(capture_file.name + MERGE_TMP_SUFFIX).unlink(missing_ok=True)


@dataclass
class MergeStats:
    """What the merged file holds."""

    numbers: list[int] = field(default_factory=list)
    correct: int = 0
    sources: int = 0

    @property
    def total(self) -> int:
        return len(self.numbers)


def merge(
    capture_file: str | os.PathLike,
    summarize: Callable[[MergeStats], dict] | None = None,
    extra_attrs: dict | None = None,
    bulk: bool = True,
) -> MergeStats:
    """Merge the capture file (if it exists) and its shards into the capture file; delete the shards.

    Problems are written in number order; a problem found in several places (a merge
    interrupted after the swap, before the shards were deleted) is taken once, from the
    capture file first, then from the shards in rank order. Root attributes come from the
    capture file, else from the first shard, updated with `extra_attrs`. `summarize(stats)`
    gives the run summary stored in the file (it is marked finished).

    The merged file is built as `<name>.merge-tmp` and swapped in with `os.replace`, so a
    merge killed at any point leaves the capture file and the shards as they were.
    bulk: copy row blocks (`CaptureWriter.copy_problems`); False decodes and re-encodes every
    problem through `ProblemRecord`s, the slower way kept to compare with (bench/merge_speed.py).
    """
    capture_file = Path(capture_file)
    try:
        lock = WriterLock.acquire(capture_file)  # no other writer replaces the file while it is merged
    except CaptureLockedError as error:
        raise CaptureBusy(str(error)) from None
    except OSError as error:
        raise CaptureError(f"cannot lock {capture_file} for writing: {error.strerror or error}") from None
    try:
        return _merge_locked(capture_file, summarize, extra_attrs, bulk)
    finally:
        lock.release()


def _merge_locked(capture_file: Path, summarize, extra_attrs, bulk: bool) -> MergeStats:
    paths = sources(capture_file)
    if not paths:
        raise FileNotFoundError(f"nothing to merge: neither {capture_file} nor shards in {shard_dir(capture_file)}")
    readers: list[CaptureReader] = []
    try:
        for path in paths:
            readers.append(CaptureReader(path))
        first = readers[0]
        config = first.config
        for reader in readers[1:]:
            check_same_config(reader.path, reader.config, config)
        owner: dict[int, CaptureReader] = {}
        correct: dict[int, dict[int, bool | None]] = {}
        for reader in readers:
            correct[id(reader)] = {p.number: p.correct for p in reader.problems()}
            for number in reader.problem_numbers:
                owner.setdefault(number, reader)
        attrs = {k: v for k, v in first.attrs.items() if k not in ("schema_version", "config")}
        attrs.update(extra_attrs or {})
        stats = MergeStats(sources=len(readers))
        tmp = capture_file.with_name(capture_file.name + MERGE_TMP_SUFFIX)
        with CaptureWriter.open(tmp, attrs, config, first.num_layers, first.similarity_dtype,
                                overwrite=True, readout_top_k=first.readout_top_k) as writer:
            order = sorted(owner)
            for start in range(0, len(order), MERGE_BATCH):
                picks = [(owner[number], number) for number in order[start:start + MERGE_BATCH]]
                if bulk:
                    writer.copy_problems(picks)
                else:
                    writer.append_batch([reader.record(number) for reader, number in picks])
                for reader, number in picks:
                    stats.numbers.append(number)
                    stats.correct += bool(correct[id(reader)][number])
            summary = summarize(stats) if summarize is not None else {"total": stats.total}
            writer.finish(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), summary)
    finally:
        for reader in readers:
            reader.close()
    os.replace(tmp, capture_file)
    sync_folder(capture_file.parent)  # the swap is on the disk before the shards go
    remove_shards(capture_file)
    return stats
