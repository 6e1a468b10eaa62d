"""The capture file: its HDF5 layout, a streaming writer and a reader.

This is the only module that knows the layout (documented for humans in
`docs/capture-format.md`). It needs h5py and numpy only, never torch, so the
renderer can read captures on a laptop.

Layout (schema 3). Every dataset is chunked and resizable along its last axis, the
one that grows: one row per entry, except the similarity matrix and the readout's
top-k tables, which are [rows, entries]::

    /                          attrs: schema_version, run metadata, config (JSON)
    /problems/number           int32 [P]   1-based problem number in the run
    /problems/question         str   [P]
    /problems/gold             str   [P]
    /problems/prediction       str   [P]
    /problems/correct          int8  [P]   1 correct, 0 wrong, -1 unknown
    /problems/first_handoff    int64 [P]   row in /handoffs
    /problems/num_handoffs     int32 [P]
    /handoffs/from_agent       str   [H]
    /handoffs/to_agent         str   [H]
    /handoffs/first_column     int64 [H]   column in /columns
    /handoffs/num_columns      int64 [H]   T, the cache length the agent reads
    /handoffs/first_segment    int64 [H]   row in /segments
    /handoffs/num_segments     int32 [H]
    /handoffs/first_readout    int64 [H]   row in /readout      } with a readout only
    /handoffs/num_readouts     int32 [H]   its latent columns    }
    /columns/layer_similarities  float16|float32 [num_layers, C]
    /columns/position          int64 [C]   original cache position (kNN leaves gaps)
    /columns/token             str   [C]   token text; latent steps read "<latent>"
    /segments/agent            str   [G]
    /segments/kind             str   [G]   "prompt" or "latent"
    /segments/start            int64 [G]   first column, relative to its hand-off
    /segments/stop             int64 [G]   one past the last column
    /readout/column            int64   [R]     column of its hand-off (0-based), increasing within it
    /readout/step              int32   [R]     the column's latent step (0-based, per agent)
    /readout/id                int32   [k, R]  top-k token ids of the step's readout, most likely first
    /readout/token             str     [k, R]  their text
    /readout/prob              float32 [k, R]  their probabilities
    /readout/entropy           float32 [R]     entropy (nats) of the step's distribution
    /readout/realign_cosine    float32 [R]     cosine of the realigned input and its nearest input
                                               embedding (NaN without --latent_space_realign)
    /readout/realign_token     str     [R]     that embedding's token, "" when none
                                               (/readout and the two /handoffs readout datasets exist only
                                               when the run kept a readout, k = --readout_top_k > 0)
    /status/committed          int64 [4]   rows of problems, handoffs, columns, segments
                                           that are complete; readers ignore the rest
    /status/finished_at        str   [1]   "" while the run is going
    /status/summary            str   [1]   JSON run summary, "" while the run is going

Why this shape: the writer works in HDF5's single-writer/multiple-reader (SWMR)
mode, which keeps the file consistent on disk at every moment, so a capture
killed at any point (even `kill -9`) stays readable and a half-written capture
can be rendered while it grows. SWMR forbids creating groups or datasets once it
is on, so everything is created up front and problems are appended as rows.
A problem becomes visible only when `/status/committed` is advanced, after its
rows are flushed: a problem in flight at a crash is simply not there. The latent
readout is a table of its own with one row per latent column (a few percent of the
columns), reached from each hand-off by its row range like the segments; its
committed rows are those the committed hand-offs' ranges cover. Problems
solved together in one batch are committed together; their hand-offs may be
written (`stage`) before their results are known and the batch committed after.

Older schemas still read: schema 1 has no readout; schema 2 kept it per column of
`/columns` (`/columns/readout_step`, `readout_id [k, C]`, ... filled with -1, "" and
NaN where a column had none) and reads into the same `LatentReadout`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Iterator, Sequence

import h5py
import numpy as np

from . import checks
from .handoff_list import HandoffList
from .hdf5_open import (
    SIGNATURE,
    NewerFormatError,
    OpenError,
    is_version_error,
    newer_format_message,
    open_read_only,
    superblock,
)
from .lock import CaptureLockedError, WriterLock
from .text import shorten

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)  # schema 1: no latent readout; schema 2: the readout per column of /columns
LATENT_TOKEN = "<latent>"
SEGMENT_KINDS = ("prompt", "latent")

_STR = h5py.string_dtype("utf-8")
_ROW_CHUNK = 4096
_COLUMN_CHUNK = 1024
_COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)
_CHUNKS_PER_PIECE = 4  # chunks written (and compressed) in a piece of `stage_in_pieces`: ~8 ms (36 layers, 2 cores)
_PROBLEMS_PER_PIECE = 8  # problems' rows gathered in one piece
# The lowest HDF5 format that allows SWMR writing, as both bounds: a newer HDF5 (2.0 under
# h5py 3.16) would otherwise write object headers that h5py 3.10-3.14 and HDF5 1.10 tools refuse.
LIBVER = ("v110", "v110")

# group -> (name, dtype) of its row datasets; the similarity matrix is special.
_TABLES: dict[str, tuple[tuple[str, object], ...]] = {
    "problems": (
        ("number", np.int32),
        ("question", _STR),
        ("gold", _STR),
        ("prediction", _STR),
        ("correct", np.int8),
        ("first_handoff", np.int64),
        ("num_handoffs", np.int32),
    ),
    "handoffs": (
        ("from_agent", _STR),
        ("to_agent", _STR),
        ("first_column", np.int64),
        ("num_columns", np.int64),
        ("first_segment", np.int64),
        ("num_segments", np.int32),
    ),
    "columns": (("position", np.int64), ("token", _STR)),
    "segments": (("agent", _STR), ("kind", _STR), ("start", np.int64), ("stop", np.int64)),
}
_COMMIT_ORDER = ("problems", "handoffs", "columns", "segments")
# The latent readout (schema 3), all or none: its row table /readout, name -> (dtype, rank), rank 2 being [k, R],
# and each hand-off's range of rows in it.
_READOUT: dict[str, tuple[object, int]] = {
    "column": (np.int64, 1),
    "step": (np.int32, 1),
    "id": (np.int32, 2),
    "token": (_STR, 2),
    "prob": (np.float32, 2),
    "entropy": (np.float32, 1),
    "realign_cosine": (np.float32, 1),
    "realign_token": (_STR, 1),
}
_READOUT_RANGE = (("first_readout", np.int64), ("num_readouts", np.int32))  # in /handoffs
# Schema 2's readout, in /columns, one entry per column (read only): name -> (dtype, rank); rank 2 is [k, C].
_READOUT_V2: dict[str, tuple[object, int]] = {
    "readout_step": (np.int32, 1),
    "readout_id": (np.int32, 2),
    "readout_token": (_STR, 2),
    "readout_prob": (np.float32, 2),
    "readout_entropy": (np.float32, 1),
    "realign_cosine": (np.float32, 1),
    "realign_token": (_STR, 1),
}


class CaptureError(Exception):
    """A capture file that cannot be read or written; the message is one line."""


class CaptureConfigMismatch(CaptureError):
    """Resuming a capture with a configuration other than the one it was started with."""


class CaptureWriteError(CaptureError):
    """Writing failed (disk full, file-size limit, I/O error); committed problems are kept."""


class CaptureBusy(CaptureError):
    """Another live process writes this capture."""


class CaptureTooNew(CaptureError):
    """The file was written by a newer HDF5 (or schema) than this reader knows."""


@dataclass
class Segment:
    """Columns [start, stop) of a hand-off that come from one agent's prompt or latent steps."""

    agent: str
    kind: str
    start: int
    stop: int


@dataclass
class LatentReadout:
    """The model's own next-token distribution at each latent column of a hand-off, one entry per column.

    A latent column's readout is the LM head applied to the hidden state that became its input
    (before realignment); columns that are not latent steps have none (`has` False).
    step: [T] int, the column's latent step (0-based, within its agent's steps; -1: none).
    ids: [T, k] int, top-k token ids, most likely first (-1: no readout).
    tokens: T lists of k strings, their text ("" where none).
    probs: [T, k] float32 probabilities (NaN where none); entropy: [T] float32, nats (NaN where none).
    realign_cosine: [T] float32, cosine of the realigned input and its nearest input embedding
        (NaN without realignment); realign_token: T strings, that embedding's token ("" where none).
    """

    step: np.ndarray
    ids: np.ndarray
    tokens: list[list[str]]
    probs: np.ndarray
    entropy: np.ndarray
    realign_cosine: np.ndarray
    realign_token: list[str]

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def has(self) -> np.ndarray:
        """[T] bool: which columns have a readout."""
        return self.ids[:, 0] >= 0 if self.top_k else np.zeros(len(self.ids), dtype=bool)

    @classmethod
    def empty(cls, width: int, top_k: int) -> "LatentReadout":
        """No readout for any of `width` columns."""
        return cls(step=np.full(width, -1, dtype=np.int64), ids=np.full((width, top_k), -1, dtype=np.int64),
                   tokens=[[""] * top_k for _ in range(width)],
                   probs=np.full((width, top_k), np.nan, dtype=np.float32),
                   entropy=np.full(width, np.nan, dtype=np.float32),
                   realign_cosine=np.full(width, np.nan, dtype=np.float32), realign_token=[""] * width)

    @classmethod
    def from_rows(cls, width: int, top_k: int, rows: "ReadoutRows") -> "LatentReadout":
        """The readout of `width` columns of which `rows.column` have one (the others none)."""
        readout = cls.empty(width, top_k)
        c = rows.column
        readout.step[c], readout.ids[c], readout.probs[c] = rows.step, rows.ids, rows.probs
        readout.entropy[c], readout.realign_cosine[c] = rows.entropy, rows.realign_cosine
        for column, tokens, nearest in zip(c.tolist(), rows.tokens, rows.realign_token):
            readout.tokens[column], readout.realign_token[column] = tokens, nearest
        return readout

    def rows(self) -> "ReadoutRows":
        """The columns that have a readout, as rows (what the file stores)."""
        c = np.flatnonzero(self.has)
        return ReadoutRows(column=c, step=np.asarray(self.step)[c], ids=np.asarray(self.ids)[c],
                           tokens=[list(self.tokens[i]) for i in c.tolist()], probs=np.asarray(self.probs)[c],
                           entropy=np.asarray(self.entropy)[c], realign_cosine=np.asarray(self.realign_cosine)[c],
                           realign_token=[self.realign_token[i] for i in c.tolist()])

    def check(self, width: int, top_k: int) -> None:
        """ValueError unless every array has `width` columns and `top_k` entries each (the token lists:
        each column that has a readout)."""
        shapes = {"ids": np.shape(self.ids), "probs": np.shape(self.probs)}
        for name, shape in shapes.items():
            if shape != (width, top_k):
                raise ValueError(f"readout {name} is {list(shape)}, not [{width}, {top_k}]")
        if len(self.tokens) != width or any(len(self.tokens[c]) != top_k for c in np.flatnonzero(self.has).tolist()):
            raise ValueError(f"readout tokens are not {width} lists of {top_k}")
        for name in ("step", "entropy", "realign_cosine"):
            if np.shape(getattr(self, name)) != (width,):
                raise ValueError(f"readout {name} is {list(np.shape(getattr(self, name)))}, not [{width}]")
        if len(self.realign_token) != width:
            raise ValueError(f"readout realign_token has {len(self.realign_token)} entries, not {width}")


@dataclass
class ReadoutRows:
    """A hand-off's readout as the file keeps it: one row per column that has one, R rows.

    column: [R] int, the column in its hand-off, increasing; step: [R] int, its latent step;
    ids: [R, k] int; tokens: R lists of k strings; probs: [R, k] float32; entropy, realign_cosine:
    [R] float32; realign_token: R strings ("" where none).
    """

    column: np.ndarray
    step: np.ndarray
    ids: np.ndarray
    tokens: list[list[str]]
    probs: np.ndarray
    entropy: np.ndarray
    realign_cosine: np.ndarray
    realign_token: list[str]

    def problem(self) -> str | None:
        """Why these rows cannot be stored (a negative token id or step), or None."""
        if self.ids.size and int(self.ids.min()) < 0:
            row = int(np.flatnonzero((self.ids < 0).any(axis=1))[0])
            return f"the readout of column {int(self.column[row])} has a negative token id"
        if self.step.size and int(self.step.min()) < 0:
            row = int(np.flatnonzero(self.step < 0)[0])
            return f"the readout of column {int(self.column[row])} has no latent step (step {int(self.step[row])})"
        return None


@dataclass
class Handoff:
    """What one agent reads from the shared cache when the previous one hands over.

    layer_similarities: [num_layers, T] float, one row per layer, one column per cached token.
    positions: [T] int, each column's original cache position.
    tokens: T strings, `LATENT_TOKEN` for latent steps.
    readout: the latent columns' readout (`LatentReadout`), or None when the capture kept none.
    """

    from_agent: str
    to_agent: str
    layer_similarities: np.ndarray
    positions: np.ndarray
    tokens: list[str]
    segments: list[Segment] = field(default_factory=list)
    readout: LatentReadout | None = None

    @property
    def name(self) -> str:
        return handoff_name(self.from_agent, self.to_agent)

    @property
    def num_columns(self) -> int:
        return int(self.layer_similarities.shape[1])

    def __repr__(self) -> str:
        layers, columns = np.shape(self.layer_similarities)
        return f"<Handoff {self.name}: {layers} layers x {columns} columns, {len(self.segments)} segments>"

    def to_xarray(self):
        """An `xarray.DataArray` [layer, column] with positions, tokens and segments as coordinates (`[notebook]`)."""
        from .tables import handoff_to_xarray

        return handoff_to_xarray(self)

    @property
    def nan_cells(self) -> int:
        """Cells that are NaN (a key of zero norm); drawn grey."""
        return int(np.isnan(self.layer_similarities).sum())

    @property
    def infinite_cells(self) -> int:
        """Cells that are +Inf or -Inf (an overflow): not similarities, to be reported as such."""
        return int(np.isinf(self.layer_similarities).sum())


@dataclass
class StagedHandoffs:
    """Hand-offs written past the committed rows by `CaptureWriter.stage`, awaiting their problems.

    base: the committed counts `[problems, handoffs, columns, segments]` they were staged on;
    num_handoffs: hand-offs per problem, in order; end: `[handoffs, columns, segments]` after them;
    readout_end: the rows of /readout after them.
    """

    base: list[int]
    num_handoffs: list[int]
    end: list[int]
    readout_end: int = 0


@dataclass
class ProblemRecord:
    """One finished problem and its hand-offs. `correct` is None when unknown."""

    number: int
    question: str
    gold: str
    prediction: str | None
    correct: bool | None
    handoffs: list[Handoff] = field(default_factory=list)


def handoff_name(from_agent: str, to_agent: str) -> str:
    """'planner', 'critic' -> 'planner_to_critic' (used in file names and --transitions)."""
    return f"{from_agent}_to_{to_agent}"


def _decode(value, where: str = "a string") -> str:
    """Text read from the file; invalid UTF-8 raises CaptureError-ready ValueError naming `where`."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadText(f"{where} is not valid UTF-8") from None
    return str(value)


def _decode_all(values, where: str) -> list[str]:
    """`_decode` of each of `values` (a slice read from a string dataset) in one comprehension (0.13 ms
    instead of 0.22 ms for 1,000 tokens); on a bad value, `_decode` names the first one."""
    try:
        return [value.decode("utf-8") for value in values]
    except (AttributeError, UnicodeDecodeError):
        return [_decode(value, where) for value in values]


class _BadText(ValueError):
    """A string in the file that is not UTF-8."""


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored in a capture (a NUL, a lone surrogate), or None when it can."""
    if "\x00" in text:
        return "contains a NUL character (U+0000)"
    try:
        text.encode("utf-8")  # in C: only a lone surrogate fails
    except UnicodeEncodeError as error:
        return f"contains a lone surrogate (U+{ord(text[error.start]):04X}), which is not valid UTF-8"
    return None


def storable_text(text: str) -> str:
    """`text` with what a capture cannot store written out as Python escapes: a NUL as `\\x00`, a lone
    surrogate as `\\udXXX`. For the model's own token texts (a byte-level vocabulary has a token
    for the NUL byte), which are data to keep, not input to refuse. The result is display text: a
    model text holding a literal backslash sequence such as `\\x00` reads back the same."""
    text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def check_storable_questions(path, questions: dict[int, str]) -> None:
    """Refuse, before anything is solved, a question that a capture cannot store."""
    for number in sorted(questions):
        problem = text_problem(str(questions[number]))
        if problem:
            raise CaptureError(f"cannot capture problem {number} into {path}: its question {problem}; "
                               "fix the data file or leave the problem out")


class _OpenFile:
    """Closing and `with` support for a class that holds an h5py file in `self._file`."""

    _file: h5py.File

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_same_config(path, stored: dict, config: dict) -> None:
    """Refuse to resume `path` when the settings it was captured with differ from `config`."""
    differences = [f"{k}: file has {stored.get(k)!r}, now {config.get(k)!r}"
                   for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k)]
    if differences:
        raise CaptureConfigMismatch(f"{path} was captured with other settings ({'; '.join(differences)}); "
                                    "pass another --capture_file or --overwrite")


def check_same_problems(path, stored: dict[int, str], questions: dict[int, str]) -> None:
    """Refuse to resume `path` when a problem number it holds now names another question.

    stored: number -> question in the file; questions: the same for the run about to resume.
    """
    for number in sorted(stored.keys() & questions.keys()):
        if stored[number] != questions[number]:
            raise CaptureConfigMismatch(
                f"{path} holds another problem {number} ({shorten(stored[number])!r}, now "
                f"{shorten(questions[number])!r}): the problems changed (other data file contents, or a "
                "hub/bundled fallback); pass another --capture_file or --overwrite")


class CaptureWriter(_OpenFile):
    """Appends finished problems to a capture file, one commit per batch (`append_batch`, or `stage` + `commit`).

    Use `CaptureWriter.open(path, run_attrs, config, num_layers)`: it takes the file's writer
    lock (`<path>.lock`, held until `close`), then creates the file, or resumes it when it
    exists (refusing a different `config`, or other problems). Each commit is flushed and
    fsync'ed before and after the commit counter moves (`durable=False` skips the fsyncs).
    """

    def __init__(self, file: h5py.File, path: Path, lock: WriterLock | None = None, durable: bool = True):
        self._file = file
        self.path = path
        self._lock = lock
        self._broken: str | None = None
        self._durable = durable
        self._fd = os.open(file.filename, os.O_RDWR)  # for fsync and space reservations
        self._committed = [int(x) for x in file["status/committed"][:]]
        self.readout_top_k = int(file["readout/id"].shape[0]) if "readout" in file else 0
        self._readout_rows = _readout_end(file, self._committed[1]) if self.readout_top_k else 0
        count = self._committed[0]
        self.completed_numbers: set[int] = set(int(n) for n in file["problems/number"][:count])

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        run_attrs: dict,
        config: dict,
        num_layers: int,
        dtype: str = "float16",
        overwrite: bool = False,
        questions: dict[int, str] | None = None,
        durable: bool = True,
        readout_top_k: int = 0,
    ) -> "CaptureWriter":
        """Create `path`, or resume it if it holds a capture of the same `config` (and `questions`).

        run_attrs: metadata stored as root attributes (JSON-able scalars).
        config: the settings that must match to resume (compared as JSON).
        questions: number -> question of the run; one a capture cannot store (NUL, lone
            surrogate) is refused here, before anything is solved, and a stored problem with
            another question refuses the resume (`check_same_problems`), before anything is copied.
        readout_top_k: k of the latent readout the file keeps (0: none); a resume keeps the file's.
        Raises CaptureBusy when another live process writes `path`.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CaptureError(f"cannot create the folder for {path}: {error.strerror or error}") from None
        if questions:
            check_storable_questions(path, questions)
        try:
            lock = WriterLock.acquire(path)
        except CaptureLockedError as error:
            raise CaptureBusy(str(error)) from None
        except OSError as error:
            raise CaptureError(f"cannot lock {path} for writing: {error.strerror or error}") from None
        try:
            if path.exists() and not overwrite and not _half_created(path):
                writer = cls._resume(path, config, questions, lock, durable)
            else:
                writer = cls._create(path, path, run_attrs, config, num_layers, dtype, lock=lock, durable=durable,
                                     readout_top_k=readout_top_k)
        except BaseException:
            lock.release()
            raise
        return writer

    @classmethod
    def _create(cls, path: Path, final_path: Path, run_attrs, config, num_layers, dtype, source=None,
                lock=None, durable=True, readout_top_k: int = 0):
        try:
            file = h5py.File(path, "w", libver=LIBVER)
        except OSError as error:
            raise CaptureError(f"cannot write capture file {final_path}: {_reason(error)}") from None
        try:
            _reserve_space(file.filename, (source.path.stat().st_size if source is not None else 0) + _MARGIN)
        except OSError as error:
            file.close()
            raise CaptureWriteError(f"cannot write capture file {final_path}: {_reason(error)}") from None
        try:
            attrs = dict(run_attrs)
            attrs["schema_version"] = SCHEMA_VERSION
            attrs["config"] = json.dumps(config, sort_keys=True)
            for key, value in attrs.items():
                file.attrs[key] = "" if value is None else value
            committed = _copy_committed(source, file, num_layers, dtype, readout_top_k)
            status = file.create_group("status")
            status.create_dataset("committed", data=np.asarray(committed, dtype=np.int64))
            status.create_dataset("finished_at", data=[""], dtype=_STR)
            status.create_dataset("summary", data=[""], dtype=_STR)
            file.swmr_mode = True
            file.flush()
            writer = cls(file, final_path, lock, durable)
            writer._sync()
        except (OSError, RuntimeError, ValueError, TypeError) as error:
            _close_quietly(file)
            raise CaptureWriteError(f"cannot write capture file {final_path}: {_reason(error)}") from None
        return writer

    @classmethod
    def _resume(cls, path: Path, config: dict, questions, lock, durable) -> "CaptureWriter":
        """Rebuild the file from its committed rows (a crashed writer leaves it locked) and go on."""
        with CaptureReader(path) as old:
            check_same_config(path, old.config, config)
            if questions:
                check_same_problems(path, old.questions(), questions)
            run_attrs = {k: v for k, v in old.attrs.items() if k not in ("schema_version", "config")}
            tmp = path.with_name(path.name + ".resume-tmp")
            writer = cls._create(tmp, path, run_attrs, config, old.num_layers, old.similarity_dtype, source=old,
                                 lock=lock, durable=durable, readout_top_k=old.readout_top_k)
        os.replace(tmp, path)
        if durable:
            sync_folder(path.parent)
        return writer

    def close(self) -> None:
        """Close the file (quietly after a failed write: what was committed stays) and release the lock."""
        try:
            if self._file.id.valid:
                if self._broken:
                    _close_quietly(self._file)
                else:
                    try:
                        self._file.close()
                    except (OSError, RuntimeError) as error:
                        raise CaptureWriteError(f"could not close {self.path}: {_reason(error)}") from None
        finally:
            if self._fd is not None:
                if not self._broken:
                    _trim_reserved(self._fd)
                os.close(self._fd)
                self._fd = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _sync(self) -> None:
        """Flush HDF5's buffers to the OS and, when durable, the OS's to the disk."""
        self._file.flush()
        if self._durable:
            os.fsync(self._fd)

    def _reserve(self, nbytes: int, what: str) -> None:
        """Make room for `nbytes` more before HDF5 writes them, so a full disk or a file-size limit
        fails here, cleanly, with the file untouched (HDF5 failing mid-write leaves a file shorter
        than its superblock says, and a library that crashes at exit)."""
        try:
            _reserve_space(self._fd, nbytes)
        except OSError as error:
            raise CaptureWriteError(f"could not write {what} to {self.path}: {_reason(error)}; the problems "
                                    "committed before are kept, and a rerun resumes after them") from None

    def _failed(self, what: str, error: BaseException) -> CaptureWriteError:
        self._broken = _reason(error)
        return CaptureWriteError(f"could not write {what} to {self.path}: {self._broken}; the problems committed "
                                 "before are kept, and a rerun resumes after them")

    # -- writing -----------------------------------------------------------------
    def append(self, problem: ProblemRecord) -> None:
        """Write one problem and its hand-offs, then commit it. Raises CaptureError on I/O failure."""
        self.append_batch([problem])

    def append_batch(self, problems: Sequence[ProblemRecord]) -> None:
        """Write problems solved together and commit them at once (one flush pair per batch, not per problem).

        A crash before the commit loses the whole batch, never a part of it. Raises CaptureError on I/O failure.
        """
        if problems:
            self.commit(self.stage([p.handoffs for p in problems], [p.number for p in problems]), problems)

    def stage(self, handoffs: Sequence[Sequence[Handoff]], numbers: Sequence[int] = ()) -> StagedHandoffs:
        """Write the hand-offs of a batch's problems (one list per problem) past the committed rows.

        They are flushed but stay invisible to readers until `commit`; a crash or another
        `stage` before it leaves the file as it was. The bulky part of a batch (the matrices,
        their compression, token strings) is written here, so a caller can do it while the
        device is still busy and keep `commit` short. `numbers` (the problems') name them in errors.
        """
        pieces = self.stage_in_pieces(handoffs, numbers)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def stage_in_pieces(self, handoffs: Sequence[Sequence[Handoff]],
                        numbers: Sequence[int] = ()) -> Generator[None, None, StagedHandoffs]:
        """`stage`, a piece at a time: a generator whose every step does a few milliseconds of work (one
        problem's checks, a few chunks written and compressed, ...) and whose return value is the
        `StagedHandoffs` (`staged = yield from writer.stage_in_pieces(...)`). A caller interleaves it
        with queued device work: as one piece, staging 64 problems of Qwen3-4B shapes took ~0.4 s
        (`bench/capture_write.py --batch 64`), longer than the device's queue lasted."""
        reserve = _MARGIN
        per_readout = 48 * (1 + self.readout_top_k) + 16 * self.readout_top_k + 32  # a row: k + 1 strings, numbers
        for of_problem, number in zip(handoffs, list(numbers) or [None] * len(handoffs)):
            for handoff in of_problem:
                self._check_text(handoff, f"hand-off {handoff.name}" + (f" of problem {number}" if number else ""))
                reserve += (2 * handoff.layer_similarities.size * 4
                            + 4 * sum(map(len, handoff.tokens)) + 48 * len(handoff.tokens)
                            + (per_readout * int(handoff.readout.has.sum())
                               if handoff.readout is not None and self.readout_top_k else 0))
            yield
        self._reserve(reserve, _problems_named(numbers))
        try:
            return (yield from self._stage(handoffs))
        except CaptureError:
            raise
        except (OSError, RuntimeError) as error:
            raise self._failed(_problems_named(numbers), error) from None
        except (ValueError, TypeError) as error:
            raise CaptureError(f"could not write {_problems_named(numbers)} to {self.path}: {_reason(error)}") from None

    def _check_text(self, handoff: Handoff, where: str) -> None:
        """Refuse a hand-off whose readout does not fit, or whose text holds a NUL or a lone surrogate."""
        readout = handoff.readout
        if readout is not None and self.readout_top_k:
            try:  # before anything below reads its arrays
                readout.check(handoff.num_columns, self.readout_top_k)
            except ValueError as error:
                raise CaptureError(f"cannot write {where} to {self.path}: {error}") from None
        readout_texts = ([t for c in np.flatnonzero(readout.has).tolist()
                          for t in (*readout.tokens[c], readout.realign_token[c])]
                         if readout is not None and self.readout_top_k else [])
        texts = (handoff.from_agent, handoff.to_agent, *handoff.tokens, *readout_texts,
                 *(s.agent for s in handoff.segments), *(s.kind for s in handoff.segments))
        _refuse_text("".join(map(str, texts)), where)  # all the hand-off's text checked at once

    def commit(self, staged: StagedHandoffs, problems: Sequence[ProblemRecord]) -> None:
        """Write `problems` (whose hand-offs are `staged`, in order) and make them visible at once."""
        if len(problems) != len(staged.num_handoffs) or staged.base != self._committed:
            raise CaptureError(f"{self.path}: the staged hand-offs do not belong to these {len(problems)} problems "
                               "or to the file's current state")
        for problem in problems:
            for what, text in (("question", problem.question), ("gold answer", problem.gold),
                               ("prediction", problem.prediction or "")):
                _refuse_text(text, f"problem {problem.number}'s {what}")
        self._reserve(_MARGIN + sum(4 * (len(p.question) + len(p.gold) + len(p.prediction or "")) + 256
                                    for p in problems), _problems_named([p.number for p in problems]))
        try:
            self._commit(staged, problems)
        except (OSError, RuntimeError) as error:
            raise self._failed(_problems_named([p.number for p in problems]), error) from None
        except (ValueError, TypeError) as error:
            raise CaptureError(f"could not write {_problems_named([p.number for p in problems])} to {self.path}: "
                               f"{_reason(error)}") from None
        self.completed_numbers.update(p.number for p in problems)


    def _stage(self, per_problem: Sequence[Sequence[Handoff]]) -> Generator[None, None, StagedHandoffs]:
        """The writing of `stage_in_pieces`, in pieces, past the rows committed when it began: a commit
        between two pieces (which would have it overwrite those rows) fails the staging instead."""
        base, readout_base = list(self._committed), self._readout_rows
        _, n_handoffs, n_columns, n_segments = base
        f = self._file

        def unchanged() -> None:  # after each piece: nothing committed meanwhile
            if self._committed != base:
                raise CaptureError(f"{self.path}: problems were committed while these hand-offs were staged "
                                   "(stage them again)")

        def pieces(writes: Iterator[None]) -> Iterator[None]:
            for _ in writes:
                yield
                unchanged()

        handoff_rows = {"from_agent": [], "to_agent": [], "first_column": [], "num_columns": [],
                        "first_segment": [], "num_segments": []}
        if self.readout_top_k:
            handoff_rows.update(first_readout=[], num_readouts=[])
        segment_rows = {"agent": [], "kind": [], "start": [], "stop": []}
        column, segment, readout_row = n_columns, n_segments, readout_base
        matrices, positions, tokens, readouts = [], [], [], []
        for problem, handoffs in enumerate(per_problem):
            if problem and problem % _PROBLEMS_PER_PIECE == 0:
                yield
            for handoff in handoffs:
                width = handoff.num_columns
                if len(handoff.tokens) != width or len(handoff.positions) != width:
                    raise ValueError(f"hand-off {handoff.name}: tokens/positions do not match {width} columns")
                handoff_rows["from_agent"].append(handoff.from_agent)
                handoff_rows["to_agent"].append(handoff.to_agent)
                handoff_rows["first_column"].append(column)
                handoff_rows["num_columns"].append(width)
                handoff_rows["first_segment"].append(segment)
                handoff_rows["num_segments"].append(len(handoff.segments))
                for seg in handoff.segments:
                    segment_rows["agent"].append(seg.agent)
                    segment_rows["kind"].append(seg.kind)
                    segment_rows["start"].append(seg.start)
                    segment_rows["stop"].append(seg.stop)
                matrices.append(handoff.layer_similarities)
                if self.readout_top_k:
                    rows = _readout_rows(handoff, width, self.readout_top_k)
                    handoff_rows["first_readout"].append(readout_row)
                    handoff_rows["num_readouts"].append(len(rows.column))
                    readouts.append(rows)
                    readout_row += len(rows.column)
                elif handoff.readout is not None and handoff.readout.has.any():
                    raise ValueError(f"hand-off {handoff.name} has a latent readout, but {self.path} keeps none")
                positions.append(np.asarray(handoff.positions, dtype=np.int64))
                tokens.extend(handoff.tokens)
                column += width
                segment += len(handoff.segments)
        yield
        unchanged()
        if matrices:
            sims = f["columns/layer_similarities"]
            yield from pieces(_append_in_pieces(sims, n_columns, column - n_columns,
                                                _ColumnBlocks(matrices, sims.dtype).columns))
            _append_rows(f["columns/position"], n_columns, np.concatenate(positions))
            yield from pieces(_append_in_pieces(f["columns/token"], n_columns, len(tokens),
                                                lambda a, b: _row_slice(tokens, a, b)))
        if readout_row > readout_base:
            for name, values in _stack_rows(readouts, f["readout/id"].shape[0]).items():
                yield from pieces(_append_in_pieces(f["readout"][name], readout_base, _count(values),
                                                    lambda a, b, values=values: _row_slice(values, a, b)))
        for name, rows in handoff_rows.items():
            _append_rows(f[f"handoffs/{name}"], n_handoffs, rows)
        for name, rows in segment_rows.items():
            _append_rows(f[f"segments/{name}"], n_segments, rows)
        f.flush()  # rows reach the disk before the commit marker that makes them visible
        return StagedHandoffs(base=base, num_handoffs=[len(h) for h in per_problem],
                              end=[n_handoffs + len(handoff_rows["from_agent"]), column, segment],
                              readout_end=readout_row)

    def _commit(self, staged: StagedHandoffs, problems: Sequence[ProblemRecord]) -> None:
        n_problems, first = staged.base[0], staged.base[1]
        rows = {"number": [], "question": [], "gold": [], "prediction": [], "correct": [], "first_handoff": [],
                "num_handoffs": []}
        for problem, count in zip(problems, staged.num_handoffs):
            rows["number"].append(problem.number)
            rows["question"].append(problem.question)
            rows["gold"].append(problem.gold)
            rows["prediction"].append(problem.prediction or "")
            rows["correct"].append(-1 if problem.correct is None else int(bool(problem.correct)))
            rows["first_handoff"].append(first)
            rows["num_handoffs"].append(count)
            first += count
        for name, values in rows.items():
            _append_rows(self._file[f"problems/{name}"], n_problems, values)
        self._sync()  # every row is on the disk before the counter that makes it visible
        committed = [n_problems + len(problems), *staged.end]
        self._file["status/committed"][:] = committed
        self._sync()
        self._committed = committed
        self._readout_rows = staged.readout_end

    def finish(self, finished_at: str, summary: dict) -> None:
        """Mark the run finished and store its summary (JSON)."""
        self._reserve(_MARGIN + 4 * len(json.dumps(summary)), "the run summary")
        try:
            self._file["status/finished_at"][0] = finished_at
            self._file["status/summary"][0] = json.dumps(summary, sort_keys=True)
            self._sync()
        except (OSError, RuntimeError) as error:
            raise self._failed("the run summary", error) from None

    # -- copying problems from other captures (the merge of a sharded run) ---------------------
    def copy_problems(self, picks: Sequence[tuple["CaptureReader", int]]) -> None:
        """Append problems copied from other capture files, in the order given, and commit them at once.

        picks: (reader, problem number) of each problem. Each source's rows are read as whole
        row ranges per dataset (`CaptureReader.copied_rows`: a few HDF5 reads per source and call,
        not one per problem and dataset), the offsets into the other tables (first_handoff,
        first_column, first_segment, first_readout) are remapped to this file, and the rows are
        written as blocks; nothing is decoded into `Handoff`s and encoded again, so the copy holds
        exactly the source's values (the matrices cast to this file's dtype only if it differs).
        Text is checked as `stage` and `commit` check it (UTF-8, no NUL). A source that keeps its
        readout in schema 2's layout is copied through `ProblemRecord`s instead. Raises
        CaptureError (naming the file) when a source's readout k differs from this file's, or a
        source cannot be read; CaptureWriteError when writing fails (what was committed stays).
        """
        if not picks:
            return
        readers = list({id(reader): reader for reader, _ in picks}.values())
        for reader in readers:
            if reader.readout_top_k and reader.readout_top_k != self.readout_top_k:
                raise CaptureError(f"cannot copy problems of {reader.path} into {self.path}: its latent readout keeps "
                                   f"the top {reader.readout_top_k} tokens, {self.path.name} "
                                   f"{self.readout_top_k or 'no readout'}")
        numbers = [number for _, number in picks]
        if any(reader.readout_top_k and reader._schema < 3 for reader in readers):
            self.append_batch([reader.record(number) for reader, number in picks])
            return
        copied: dict[int, dict[int, _CopiedProblem]] = {}
        for reader in readers:
            copied[id(reader)] = reader.copied_rows([n for r, n in picks if r is reader])
        pieces = [copied[id(reader)][number] for reader, number in picks]
        sims = self._file["columns/layer_similarities"]
        self._reserve(_MARGIN + sum(piece.nbytes(sims.dtype.itemsize) for piece in pieces), _problems_named(numbers))
        try:
            staged = self._write_copied(pieces)
            self._commit(staged, [piece.record for piece in pieces])
        except (OSError, RuntimeError) as error:
            raise self._failed(_problems_named(numbers), error) from None
        except (ValueError, TypeError) as error:
            raise CaptureError(f"could not copy {_problems_named(numbers)} to {self.path}: {_reason(error)}") from None
        self.completed_numbers.update(numbers)

    def _write_copied(self, pieces: Sequence["_CopiedProblem"]) -> StagedHandoffs:
        """Write the hand-offs of copied problems (in order) past the committed rows, as `_stage` does."""
        _, n_handoffs, n_columns, n_segments = self._committed
        f, k = self._file, self.readout_top_k
        column, segment, readout_row = n_columns, n_segments, self._readout_rows
        handoff_rows: dict[str, list] = {name: [] for name, _ in _TABLES["handoffs"]}
        if k:
            handoff_rows.update(first_readout=[], num_readouts=[])
        blocks: dict[str, list] = {"sims": [], "position": [], "token": [], **{f"seg_{n}": [] for n, _ in
                                                                                  _TABLES["segments"]}}
        readout: dict[str, list] = {name: [] for name in _READOUT}
        for piece in pieces:
            for handoff in piece.handoffs:
                handoff_rows["from_agent"].append(handoff.from_agent)
                handoff_rows["to_agent"].append(handoff.to_agent)
                handoff_rows["first_column"].append(column)
                handoff_rows["num_columns"].append(handoff.width)
                handoff_rows["first_segment"].append(segment)
                handoff_rows["num_segments"].append(len(handoff.segments["start"]))
                blocks["sims"].append(handoff.sims)
                blocks["position"].append(handoff.position)
                blocks["token"].append(handoff.token)
                for name, values in handoff.segments.items():
                    blocks[f"seg_{name}"].append(values)
                column += handoff.width
                segment += len(handoff.segments["start"])
                if k:
                    rows = 0 if handoff.readout is None else handoff.readout["column"].shape[-1]
                    handoff_rows["first_readout"].append(readout_row)
                    handoff_rows["num_readouts"].append(rows)
                    if rows:
                        for name, values in handoff.readout.items():
                            readout[name].append(values)
                    readout_row += rows
        if column > n_columns:
            sims = f["columns/layer_similarities"]
            sims.resize(column, axis=1)
            sims[:, n_columns:column] = np.concatenate(blocks["sims"], axis=1).astype(sims.dtype, copy=False)
            _append_rows(f["columns/position"], n_columns, np.concatenate(blocks["position"]).astype(np.int64))
            _append_rows(f["columns/token"], n_columns, np.concatenate(blocks["token"]))
        if segment > n_segments:
            for name, _ in _TABLES["segments"]:
                _append_rows(f[f"segments/{name}"], n_segments, np.concatenate(blocks[f"seg_{name}"]))
        if readout_row > self._readout_rows:
            for name, (dtype, _) in _READOUT.items():
                values = np.concatenate(readout[name], axis=-1)
                _append_rows(f[f"readout/{name}"], self._readout_rows,
                             values if dtype is _STR else values.astype(dtype, copy=False))
        for name, rows in handoff_rows.items():
            _append_rows(f[f"handoffs/{name}"], n_handoffs, rows)
        f.flush()  # rows reach the disk before the commit marker that makes them visible
        return StagedHandoffs(base=list(self._committed), num_handoffs=[len(p.handoffs) for p in pieces],
                              end=[n_handoffs + len(handoff_rows["from_agent"]), column, segment],
                              readout_end=readout_row)


def _reason(error: BaseException) -> str:
    """An h5py/OS error as one short line: the OS's words when it gave some (e.g. 'No space left on device')."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = " ".join(str(error).split()) or type(error).__name__
    for marker in ("errno = 28", "No space left"):
        if marker in text:
            return "No space left on device"
    if "errno = 27" in text or "File too large" in text:
        return "File too large (the file-size limit was reached)"
    return text[:300]


def _refuse_text(text: str, where: str) -> None:
    problem = text_problem(str(text))
    if problem:
        raise CaptureError(f"cannot capture {where}: it {problem}")


def _close_quietly(file: h5py.File) -> None:
    """Close an h5py file whose writes failed (disk full, size limit), without a crash or noise.

    HDF5's last flush fails again. `File.close` would then leave the file half-closed in
    HDF5, which crashes the process when the library shuts down at exit (a segfault after
    the one-line error). Dropping every object id of the file, then the file id itself,
    ends it cleanly; the errors HDF5 reports on the way (the same failed write) are not
    shown again.
    """
    import gc
    import sys

    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        fid = file.id
        if fid.valid:
            try:
                others = fid.get_obj_ids(types=h5py.h5f.OBJ_ALL & ~h5py.h5f.OBJ_FILE)
            except Exception:  # noqa: BLE001
                others = []
            for oid in others:
                for _ in range(8):
                    if not oid.valid:
                        break
                    with contextlib.suppress(Exception):  # the write error was already reported in one line
                        h5py.h5i.dec_ref(oid)
            for _ in range(8):
                if not fid.valid:
                    break
                with contextlib.suppress(Exception):
                    fid.close()
        gc.collect()
    finally:
        sys.unraisablehook = hook


_MARGIN = 1 << 20  # bytes reserved beyond an estimate of what a write adds (metadata, heaps)


def _reserve_space(file, nbytes: int) -> None:
    """Allocate disk space up to the file's HDF5 end (its superblock) plus `nbytes` (`file`: path or fd).

    Raises OSError (ENOSPC, EFBIG) when it does not fit; a file system without fallocate gets no reservation.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(file, os.O_RDWR) if not isinstance(file, int) else file
    try:
        end = _hdf5_end(fd)
        try:
            os.posix_fallocate(fd, 0, end + nbytes)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            raise
    finally:
        if fd is not file:
            os.close(fd)


def _hdf5_end(fd: int) -> int:
    """The end-of-file address the superblock on disk records (the file's size when unknown)."""
    from .hdf5_open import parse_superblock

    head = parse_superblock(os.pread(fd, 96, 0))
    return head[2] if head is not None and head[2] > 0 else os.fstat(fd).st_size


def _trim_reserved(fd: int) -> None:
    """Give back reserved space past the HDF5 end of a cleanly closed file."""
    with contextlib.suppress(OSError):
        end = _hdf5_end(fd)
        if 0 < end < os.fstat(fd).st_size:
            os.ftruncate(fd, end)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a new or renamed file in it survives a power loss (quietly skipped where a
    folder cannot be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _half_created(path: Path) -> bool:
    """Whether `path` is what a writer killed while creating it leaves: no committed problem, and a
    header that is unreadable or only LatentMAS's own groups. Such a file is recreated, not refused."""
    try:
        if path.stat().st_size == 0:
            return True
        with open(path, "rb") as f:
            start = f.read(8)
    except OSError:
        return False
    if start != SIGNATURE:
        return False  # not HDF5 at all: someone else's file, refused by the resume
    try:
        file = open_read_only(path)
    except NewerFormatError:
        return False
    except OpenError:
        head = superblock(path)  # the file's size includes the space its writer reserved
        return (head[2] if head is not None and head[2] > 0 else path.stat().st_size) <= _HALF_CREATED_MAX_BYTES
    try:
        if not set(file.keys()) <= {*_TABLES, "readout", "status"}:
            return False
        if "status" not in file or "committed" not in file["status"] or "config" not in file.attrs:
            return True
        return int(file["status/committed"][0]) == 0 and "schema_version" not in file.attrs
    except Exception:  # noqa: BLE001 - an unreadable header of our own groups
        return True
    finally:
        _close_quietly(file)


_HALF_CREATED_MAX_BYTES = 1 << 20  # a writer killed while creating leaves a few KB


def _problems_named(numbers: Sequence[int]) -> str:
    if not numbers:
        return "hand-offs"
    return ("problem " if len(numbers) == 1 else "problems ") + ", ".join(str(n) for n in numbers)


def _append_in_pieces(dataset: h5py.Dataset, start: int, count: int, rows) -> Iterator[None]:
    """`count` rows appended at `start` of the dataset's last axis, `_CHUNKS_PER_PIECE` chunks at a time:
    each piece takes `rows(a, b)` (rows a..b of the `count`), writes them up to a chunk boundary, flushes
    the dataset (so those chunks are compressed there, and once) and yields."""
    at, stop, chunk = start, start + count, dataset.chunks[-1]
    while at < stop:
        end = min(stop, (at // chunk + _CHUNKS_PER_PIECE) * chunk)
        _append_rows(dataset, at, rows(at - start, end - start))
        dataset.flush()
        yield
        at = end


class _ColumnBlocks:
    """Matrices `[layers, width_i]` side by side, handed out a range of columns at a time (no copy of the
    whole: a batch of 64 problems' similarities is ~24 MB)."""

    def __init__(self, matrices: Sequence[np.ndarray], dtype):
        self.matrices, self.dtype = matrices, dtype
        self.starts = np.concatenate([[0], np.cumsum([m.shape[1] for m in matrices])])

    def columns(self, a: int, b: int) -> np.ndarray:
        """Columns a..b of the matrices side by side, `[layers, b - a]` in `dtype`."""
        first, last = np.searchsorted(self.starts, a, "right") - 1, np.searchsorted(self.starts, b, "left")
        parts = [m[:, max(a - s, 0):b - s] for m, s in zip(self.matrices[first:last], self.starts[first:last])]
        return np.concatenate(parts, axis=1).astype(self.dtype, copy=False)


def _count(rows) -> int:
    """How many rows `rows` holds (a list, or an array whose last axis is the rows)."""
    return rows.shape[-1] if isinstance(rows, np.ndarray) else len(rows)


def _row_slice(rows, a: int, b: int):
    """Rows a..b of `rows` (a list, or an array whose last axis is the rows)."""
    return rows[..., a:b] if isinstance(rows, np.ndarray) else rows[a:b]


def _append_rows(dataset: h5py.Dataset, start: int, rows) -> None:
    """Write `rows` (a list, or an array whose last axis is the rows) at `start` of the dataset's last axis."""
    stop = start + _count(rows)
    if stop == start:
        return
    dataset.resize(stop, axis=dataset.ndim - 1)
    dataset[..., start:stop] = rows


def _readout_rows(handoff: Handoff, width: int, top_k: int) -> ReadoutRows:
    """The rows `handoff` (of `width` columns) adds to /readout; ValueError when its readout does not fit."""
    if handoff.readout is None:
        return LatentReadout.empty(0, top_k).rows()
    handoff.readout.check(width, top_k)
    rows = handoff.readout.rows()
    problem = rows.problem()
    if problem:
        raise ValueError(f"hand-off {handoff.name}: {problem}")
    return rows


def _stack_rows(readouts: Sequence[ReadoutRows], top_k: int) -> dict[str, object]:
    """Consecutive hand-offs' readout rows as /readout's datasets hold them: name -> [R] or [k, R] values."""
    def joined(name, dtype):
        parts = [getattr(r, name) for r in readouts]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, top_k) if name in ("ids", "probs")
                                                                          else 0, dtype)
    tokens = np.array([t for r in readouts for ts in r.tokens for t in ts], dtype=object).reshape(-1, top_k).T
    return {"column": joined("column", np.int64), "step": joined("step", np.int32),
            "id": joined("ids", np.int32).reshape(-1, top_k).T, "token": tokens,
            "prob": joined("probs", np.float32).reshape(-1, top_k).T, "entropy": joined("entropy", np.float32),
            "realign_cosine": joined("realign_cosine", np.float32),
            "realign_token": [t for r in readouts for t in r.realign_token]}


def _readout_end(file: h5py.File, handoffs: int) -> int:
    """Rows of /readout that the first `handoffs` hand-offs' ranges cover (the committed ones)."""
    if not handoffs:
        return 0
    first = file["handoffs/first_readout"][:handoffs].astype(np.int64)
    return int((first + file["handoffs/num_readouts"][:handoffs]).max())


def _copy_committed(source: "CaptureReader | None", file: h5py.File, num_layers: int, dtype: str,
                    readout_top_k: int = 0) -> list[int]:
    """Create every table in `file`, filled with the committed rows of `source` (if any); the readout's
    datasets too when `readout_top_k` > 0 (copied from `source`, which then must have one, of any schema)."""
    committed = source.committed if source is not None else [0, 0, 0, 0]
    for group_name, columns in _TABLES.items():
        rows = committed[_COMMIT_ORDER.index(group_name)]
        for name, dt in columns:
            data = source._file[f"{group_name}/{name}"][:rows] if source is not None else None
            _create_rows(file.require_group(group_name), name, dt, data, rows)
    n_columns = committed[2]
    sims = file["columns"].create_dataset(
        "layer_similarities", shape=(num_layers, n_columns), maxshape=(num_layers, None), dtype=dtype,
        chunks=(num_layers, _COLUMN_CHUNK), **_COMPRESSION)
    if n_columns:
        sims[:] = source._file["columns/layer_similarities"][:, :n_columns]
    if readout_top_k:
        ranges, rows = source._committed_readout() if source is not None else (None, None)
        for name, dt in _READOUT_RANGE:
            _create_rows(file["handoffs"], name, dt, None if ranges is None else ranges[name], committed[1])
        group = file.create_group("readout")
        count = 0 if rows is None else len(rows["column"])
        for name, (dt, rank) in _READOUT.items():
            _create_rows(group, name, dt, None if rows is None else rows[name], count,
                         top_k=readout_top_k if rank == 2 else 0)
    return list(committed)


def _create_rows(group: h5py.Group, name: str, dtype, data, rows: int, top_k: int = 0) -> None:
    """A resizable, chunked, compressed dataset of `rows` entries ([top_k, rows] when `top_k`), holding `data`."""
    if top_k:
        shape, maxshape, chunks = (top_k, rows), (top_k, None), (top_k, _COLUMN_CHUNK)
    else:
        shape, maxshape, chunks = (rows,), (None,), (_ROW_CHUNK,)
    ds = group.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks, **_COMPRESSION)
    if rows:
        ds[...] = data


@dataclass
class ProblemSummary:
    """A problem's row, without its matrices."""

    number: int
    question: str
    gold: str
    prediction: str
    correct: bool | None
    handoff_names: list[str]
    handoff_columns: list[int]  # T of each hand-off, in the same order


# What a reader accepts: (kinds, item sizes) per dataset; "str" is a string dtype.
_INT = ("iu", (1, 2, 4, 8))
_FLOAT = ("f", (2, 4))
_BUILTIN_FILTERS = {1, 2, 3, 4, 5, 6}  # deflate, shuffle, fletcher32, szip, nbit, scaleoffset: no plugin loads


def _reading(method):
    """Turn any failure of h5py/numpy on a hostile file into a one-line CaptureError naming the file."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except CaptureError:
            raise
        except checks.TableError as error:
            raise CaptureError(f"{self.path} is inconsistent: {error}") from None
        except _BadText as error:
            raise CaptureError(f"{self.path} is damaged: {error}") from None
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError, MemoryError) as error:
            if is_version_error(error):
                raise CaptureTooNew(f"{self.path} {newer_format_message()}") from None
            raise CaptureError(f"{self.path} is damaged and cannot be read ({_reason(error)})") from None
    return wrapper


class CaptureReader(_OpenFile):
    """Read-only view of the committed part of a capture file.

    Opening checks the file before anything is read from it: every object the layout names
    is reached through hard links only (no soft or external links), no dataset keeps its
    data outside the file (external storage, virtual layout) or needs a filter plugin,
    dtypes and ranks are the schema's, and the tables agree with each other (`capture.checks`).
    Anything else is a one-line CaptureError; nothing outside the file is ever read.

    >>> with CaptureReader("captures/run.h5") as capture:
    ...     for handoff in capture.handoffs(problem=1):
    ...         handoff.layer_similarities  # [num_layers, T]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists() and not self.path.is_symlink():
            raise CaptureError(f"capture file not found: {self.path}")
        try:
            self._file = open_read_only(self.path)
        except NewerFormatError as error:
            raise CaptureTooNew(f"{self.path} {error}") from None
        except OpenError as error:
            raise CaptureError(f"{self.path} {error}") from None
        try:
            self._load()
        except BaseException:
            _close_quietly(self._file)
            raise

    @_reading
    def _load(self) -> None:
        self._groups: dict[str, h5py.Group] = {}
        self._attrs = self._check_attrs()
        self._check_schema()
        # Read the commit marker before touching the tables, so a file still being
        # written never shows rows beyond it.
        committed = self._dataset("status", "committed", _INT, 1)[()]
        self._datasets = {(group, name): self._dataset(group, name, "str" if dt is _STR else _INT, 1)
                          for group, columns in _TABLES.items() for name, dt in columns}
        for name in ("finished_at", "summary"):
            self._datasets[("status", name)] = self._dataset("status", name, "str", 1)
        sims = self._datasets[("columns", "layer_similarities")] = self._dataset(
            "columns", "layer_similarities", _FLOAT, 2)
        lengths = {g: min(self._datasets[(g, n)].shape[0] for n, _ in columns) for g, columns in _TABLES.items()}
        lengths["columns"] = min(lengths["columns"], sims.shape[1])
        self._readout_k = self._readout_datasets()
        if self._readout_k and self._schema >= 3:
            lengths["handoffs"] = min(lengths["handoffs"],
                                      *(self._datasets[("handoffs", n)].shape[0] for n, _ in _READOUT_RANGE))
        elif self._readout_k:
            lengths["columns"] = min(lengths["columns"],
                                     *(self._datasets[("columns", n)].shape[-1] for n in _READOUT_V2))
        self.committed = checks.check_committed(np.asarray(committed), lengths)
        if sims.shape[0] < 1:
            raise checks.TableError("/columns/layer_similarities has no layers")
        problems, handoffs, columns, segments = self.committed
        for group, count in zip(_COMMIT_ORDER, self.committed):
            checks.check_read_size(f"/{group}", count, 8)
        self._problem_table = {name: self._datasets[("problems", name)][:problems]
                               for name in ("number", "correct", "first_handoff", "num_handoffs")}
        ranged = ("first_readout", "num_readouts") if self._readout_k and self._schema >= 3 else ()
        self._handoff_table = {name: self._datasets[("handoffs", name)][:handoffs]
                               for name in ("first_column", "num_columns", "first_segment", "num_segments", *ranged)}
        p, h = self._problem_table, self._handoff_table
        checks.check_problem_numbers(p["number"])
        checks.check_correct(p["correct"])
        checks.check_ranges("/problems", p["first_handoff"], p["num_handoffs"], handoffs, "/handoffs")
        checks.check_ranges("/handoffs", h["first_column"], h["num_columns"], columns, "/columns")
        checks.check_ranges("/handoffs", h["first_segment"], h["num_segments"], segments, "/segments")
        checks.check_segments(h["first_segment"], h["num_segments"], h["num_columns"],
                              self._datasets[("segments", "start")][:segments],
                              self._datasets[("segments", "stop")][:segments])
        self._readout_committed = self._check_readout_rows() if ranged else 0
        widest = int(h["num_columns"].max()) if handoffs else 0
        checks.check_read_size("a hand-off's /columns/layer_similarities", widest,
                               sims.shape[0] * sims.dtype.itemsize)
        self._numbers = p["number"].astype(int)
        self._row_of = {int(n): i for i, n in enumerate(self._numbers)}
        self._strings: dict[tuple[str, str], list[str]] = {}

    def _readout_datasets(self) -> int:
        """Check and keep the latent readout's datasets; their k (0 when the file has none, as in schema 1)."""
        if self._schema >= 3:
            wanted = [("readout", name, spec) for name, spec in _READOUT.items()]
            wanted += [("handoffs", name, (dt, 1)) for name, dt in _READOUT_RANGE]
            root = self._file.get("readout", getlink=True) is not None
        else:
            wanted = [("columns", name, spec) for name, spec in _READOUT_V2.items()]
            root = False
        present = [(g, n) for g, n, _ in wanted
                   if (g != "readout" or root) and self._group(g).get(n, getlink=True) is not None]
        if not present and not root:
            return 0
        if len(present) != len(wanted):
            missing = ", ".join(f"/{g}/{n}" for g, n, _ in wanted if (g, n) not in present)
            raise CaptureError(f"{self.path} has part of a latent readout (missing {shorten(missing, 120)})")
        widths = set()
        for group, name, (dt, rank) in wanted:
            allowed = "str" if dt is _STR else _INT if np.dtype(dt).kind in "iu" else _FLOAT
            dataset = self._datasets[(group, name)] = self._dataset(group, name, allowed, rank)
            if rank == 2:
                widths.add(dataset.shape[0])
        if len(widths) != 1 or min(widths) < 1:
            where = "/readout" if self._schema >= 3 else "/columns"
            raise CaptureError(f"{self.path}: the latent readout's top-k tables in {where} disagree on k "
                               f"({', '.join(str(w) for w in sorted(widths))})")
        return widths.pop()

    def _check_readout_rows(self) -> int:
        """Check the committed hand-offs' rows of /readout (schema 3) against them; the rows they cover."""
        h = self._handoff_table
        available = min(self._datasets[("readout", name)].shape[-1] for name in _READOUT)
        checks.check_ranges("/handoffs", h["first_readout"], h["num_readouts"], available, "/readout")
        ends = h["first_readout"].astype(np.int64) + h["num_readouts"]
        count = int(ends.max()) if ends.size else 0
        checks.check_read_size("/readout", count, 8 * (2 + 2 * self._readout_k))
        checks.check_readout_rows(h["first_readout"], h["num_readouts"], h["num_columns"],
                                  self._datasets[("readout", "column")][:count],
                                  self._datasets[("readout", "step")][:count])
        return count

    @property
    def readout_top_k(self) -> int:
        """k of the latent readout the file keeps; 0 when it keeps none."""
        return self._readout_k

    def _check_attrs(self) -> dict:
        """Root attributes as Python scalars; arrays, references or bad UTF-8 are refused."""
        attrs = {}
        for key in self._file.attrs.keys():
            where = f"root attribute {shorten(key, 40)!r}"
            value = self._file.attrs[key]
            if isinstance(value, np.ndarray) or isinstance(value, (list, tuple)):
                raise CaptureError(f"{self.path}: {where} is an array; the schema allows scalars and strings only")
            if isinstance(value, bytes):
                value = _decode(value, where)
            elif isinstance(value, np.generic) and value.dtype.kind in "biuf":
                value = value.item()
            elif not isinstance(value, (str, int, float, bool)):
                raise CaptureError(f"{self.path}: {where} is a {type(value).__name__}; the schema allows scalars "
                                   "and strings only")
            attrs[key] = value
        return attrs

    def _check_schema(self) -> None:
        version = self._attrs.get("schema_version")
        if version is None:
            raise CaptureError(f"{self.path} is not a LatentMAS capture (no schema_version attribute)")
        if isinstance(version, bool) or not isinstance(version, int):
            raise CaptureError(f"{self.path} is not a LatentMAS capture (schema_version is "
                               f"{shorten(repr(version), 40)}, not an integer)")
        if version not in READABLE_SCHEMAS:
            raise CaptureTooNew(
                f"{self.path} uses capture schema {version}; this version of latentmas reads schemas "
                f"{', '.join(str(v) for v in READABLE_SCHEMAS)}")
        config = self._attrs.get("config")
        if not isinstance(config, str):
            raise CaptureError(f"{self.path} is not a LatentMAS capture (no config attribute)")
        try:
            parsed = json.loads(config)
        except ValueError:
            raise CaptureError(f"{self.path}: the config attribute is not JSON") from None
        if not isinstance(parsed, dict):
            raise CaptureError(f"{self.path}: the config attribute is not a JSON object")
        self._config = parsed
        self._schema = version

    def _dataset(self, group: str, name: str, allowed, rank: int) -> h5py.Dataset:
        """`/group/name`, reached through hard links only, its data in this file, its dtype and rank the schema's."""
        where = f"/{group}/{name}"
        dataset = self._member(self._group(group), name, where)
        if not isinstance(dataset, h5py.Dataset):
            raise CaptureError(f"{self.path}: {where} is a group where the schema has a dataset")
        plist = dataset.id.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            raise CaptureError(f"{self.path}: {where} is a virtual dataset (its data lives in other files), "
                               "which a capture may not use")
        if plist.get_external_count():
            raise CaptureError(f"{self.path}: {where} keeps its data in external files, which a capture may not use")
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if code not in _BUILTIN_FILTERS:
                raise CaptureError(f"{self.path}: {where} needs HDF5 filter {code}, a plugin this reader does not load")
        if dataset.ndim != rank:
            raise CaptureError(f"{self.path}: {where} has {dataset.ndim} dimensions, the schema {rank}")
        dtype = dataset.dtype
        if allowed == "str":
            ok = h5py.check_string_dtype(dtype) is not None
            expected = "strings"
        else:
            kinds, sizes = allowed
            ok = dtype.kind in kinds and dtype.itemsize in sizes
            expected = "floats of 2 or 4 bytes" if kinds == "f" else "integers"
        if not ok:
            raise CaptureError(f"{self.path}: {where} holds {dtype}, the schema {expected}")
        return dataset

    def _group(self, name: str) -> h5py.Group:
        if name not in self._groups:
            group = self._member(self._file, name, f"/{name}")
            if not isinstance(group, h5py.Group):
                raise CaptureError(f"{self.path}: /{name} is a dataset where the schema has a group")
            self._groups[name] = group
        return self._groups[name]

    def _member(self, parent: h5py.Group, name: str, where: str):
        """parent[name] when it is a hard link (soft and external links are refused, never followed)."""
        link = parent.get(name, getlink=True)
        if link is None:
            raise CaptureError(f"{self.path} is not a LatentMAS capture (missing {where})")
        if not isinstance(link, h5py.HardLink):
            kind = "an external" if isinstance(link, h5py.ExternalLink) else "a soft"
            raise CaptureError(f"{self.path}: {where} is {kind} link; a capture holds its objects itself, "
                               "and links are not followed")
        return parent[name]

    def _texts(self, group: str, name: str) -> list[str]:
        """Every committed string of `/group/name`, decoded once and kept."""
        key = (group, name)
        if key not in self._strings:
            count = self.committed[_COMMIT_ORDER.index(group)]
            raw = self._datasets[key][:count]
            self._strings[key] = [_decode(v, f"/{group}/{name} row {i}") for i, v in enumerate(raw)]
        return self._strings[key]

    # -- run metadata ------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def num_layers(self) -> int:
        return int(self._datasets[("columns", "layer_similarities")].shape[0])

    @property
    def similarity_dtype(self) -> str:
        return str(self._datasets[("columns", "layer_similarities")].dtype)

    @property
    @_reading
    def finished_at(self) -> str:
        values = self._datasets[("status", "finished_at")]
        return _decode(values[0], "/status/finished_at") if values.shape[0] else ""

    @property
    @_reading
    def summary(self) -> dict:
        values = self._datasets[("status", "summary")]
        text = _decode(values[0], "/status/summary") if values.shape[0] else ""
        if not text:
            return {}
        try:
            summary = json.loads(text)
        except ValueError:
            raise CaptureError(f"{self.path}: /status/summary is not JSON") from None
        return summary if isinstance(summary, dict) else {"summary": summary}

    # -- problems and hand-offs ----------------------------------------------------
    @property
    def problem_numbers(self) -> list[int]:
        """Numbers of the committed problems, in the order they were written."""
        return [int(n) for n in self._numbers]

    @_reading
    def questions(self) -> dict[int, str]:
        """number -> question of every committed problem."""
        return dict(zip(self.problem_numbers, self._texts("problems", "question")))

    @_reading
    def problem(self, number: int) -> ProblemSummary:
        return self._summary(self._row(number))

    @_reading
    def problems(self) -> list[ProblemSummary]:
        """Every committed problem's row, in file order; each table column is read once (fast for many)."""
        return [self._summary(row) for row in range(len(self._numbers))]

    def _summary(self, row: int) -> ProblemSummary:
        p, h = self._problem_table, self._handoff_table
        first, count = int(p["first_handoff"][row]), int(p["num_handoffs"][row])
        from_agents, to_agents = self._texts("handoffs", "from_agent"), self._texts("handoffs", "to_agent")
        correct = int(p["correct"][row])
        return ProblemSummary(
            number=int(self._numbers[row]), question=self._texts("problems", "question")[row],
            gold=self._texts("problems", "gold")[row], prediction=self._texts("problems", "prediction")[row],
            correct=None if correct < 0 else bool(correct),
            handoff_names=[handoff_name(a, b) for a, b in zip(from_agents[first:first + count],
                                                               to_agents[first:first + count])],
            handoff_columns=[int(t) for t in h["num_columns"][first:first + count]])

    def handoffs(self, problem: int, which: Sequence[int] | None = None) -> HandoffList:
        """The hand-offs of one problem, in run order, each read (with its matrix) when first used.

        which: their 0-based places in the problem's run order, to read only those (default: all).
        A list-like (`len`, `[i]`, `for`) that is also an iterator (`next`): see `HandoffList`.
        """
        row = self._row(problem)
        first = int(self._problem_table["first_handoff"][row])
        count = int(self._problem_table["num_handoffs"][row])
        places = list(range(count) if which is None else which)
        for index in places:
            if not 0 <= index < count:
                raise CaptureError(f"problem {problem} in {self.path} has {count} hand-offs, no hand-off {index}")
        names = self.problem(problem).handoff_names
        return HandoffList([first + i for i in places], self._handoff, [names[i] for i in places], problem)

    def handoff(self, problem: int, name: str) -> Handoff:
        for handoff in self.handoffs(problem):
            if handoff.name == name:
                return handoff
        raise CaptureError(f"problem {problem} in {self.path} has no hand-off {name!r}")

    def _row(self, number: int) -> int:
        if number not in self._row_of:
            raise CaptureError(f"{self.path} has no problem {number} (it holds {number_ranges(self.problem_numbers)})")
        return self._row_of[number]

    @_reading
    def _handoff(self, index: int) -> Handoff:
        h = self._handoff_table
        first, width = int(h["first_column"][index]), int(h["num_columns"][index])
        seg_first, seg_count = int(h["first_segment"][index]), int(h["num_segments"][index])
        seg = slice(seg_first, seg_first + seg_count)
        d = self._datasets
        segments = [
            Segment(_decode(a, "/segments/agent"), _decode(k, "/segments/kind"), int(b), int(e))
            for a, k, b, e in zip(d[("segments", "agent")][seg], d[("segments", "kind")][seg],
                                  d[("segments", "start")][seg], d[("segments", "stop")][seg])
        ]
        cols = slice(first, first + width)
        return Handoff(
            from_agent=self._texts("handoffs", "from_agent")[index],
            to_agent=self._texts("handoffs", "to_agent")[index],
            layer_similarities=d[("columns", "layer_similarities")][:, cols],
            positions=d[("columns", "position")][cols].astype(np.int64),
            tokens=_decode_all(d[("columns", "token")][cols], "/columns/token"),
            segments=segments,
            readout=self._readout_of(index) if self._readout_k else None,
        )

    def _readout_of(self, index: int) -> LatentReadout:
        """Hand-off `index`'s readout, from /readout (schema 3) or from /columns (schema 2)."""
        h = self._handoff_table
        first, width = int(h["first_column"][index]), int(h["num_columns"][index])
        if self._schema < 3:
            return self._readout(slice(first, first + width))
        return LatentReadout.from_rows(width, self._readout_k, self._readout_rows(index))

    def _readout_rows(self, index: int) -> ReadoutRows:
        """Hand-off `index`'s rows of /readout; a negative token id is refused (the range was checked at open)."""
        h, d = self._handoff_table, self._datasets
        start = int(h["first_readout"][index])
        rows = slice(start, start + int(h["num_readouts"][index]))
        ids = d[("readout", "id")][:, rows].T.astype(np.int64)
        if ids.size and ids.min() < 0:
            row = start + int(np.flatnonzero((ids < 0).any(axis=1))[0])
            raise checks.TableError(f"/readout/id row {row} holds {int(ids[row - start].min())}, not a token id")
        return ReadoutRows(
            column=d[("readout", "column")][rows].astype(np.int64),
            step=d[("readout", "step")][rows].astype(np.int64), ids=ids,
            tokens=[_decode_all(row, "/readout/token") for row in d[("readout", "token")][:, rows].T],
            probs=d[("readout", "prob")][:, rows].T.astype(np.float32),
            entropy=d[("readout", "entropy")][rows].astype(np.float32),
            realign_cosine=d[("readout", "realign_cosine")][rows].astype(np.float32),
            realign_token=_decode_all(d[("readout", "realign_token")][rows], "/readout/realign_token"))

    def record(self, number: int) -> ProblemRecord:
        """Problem `number` with every hand-off read, as `CaptureWriter.append` takes it."""
        problem = self.problem(number)
        return ProblemRecord(number, problem.question, problem.gold, problem.prediction, problem.correct,
                             list(self.handoffs(number)))

    @_reading
    def copied_rows(self, numbers: Sequence[int]) -> dict[int, "_CopiedProblem"]:
        """number -> the stored rows of that problem, for `CaptureWriter.copy_problems` (schema 3 readout, or none).

        The hand-offs' rows are read in blocks: one slice per dataset over the rows a group of
        hand-offs covers, split (halves, recursively) until no block reads more than about twice
        the rows it needs, so problems stored in the order asked for cost a few reads in all.
        """
        p, h = self._problem_table, self._handoff_table
        rows = sorted({self._row(n) for n in numbers})
        first = p["first_handoff"][rows].astype(np.int64)
        count = p["num_handoffs"][rows].astype(np.int64)
        wanted = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count)] + [np.zeros(0, np.int64)])
        ranged = bool(self._readout_k)
        spans = {"columns": (h["first_column"][wanted].astype(np.int64), h["num_columns"][wanted].astype(np.int64)),
                 "segments": (h["first_segment"][wanted].astype(np.int64),
                              h["num_segments"][wanted].astype(np.int64)),
                 "readout": ((h["first_readout"][wanted].astype(np.int64), h["num_readouts"][wanted].astype(np.int64))
                             if ranged else (np.zeros_like(wanted), np.zeros_like(wanted)))}
        copied: dict[int, _CopiedHandoff] = {}
        for block in _blocks(spans, 0, len(wanted)):
            self._copy_block(wanted[block], {t: (f[block], c[block]) for t, (f, c) in spans.items()}, copied)
        from_agents, to_agents = self._texts("handoffs", "from_agent"), self._texts("handoffs", "to_agent")
        out = {}
        for row, f, c in zip(rows, first.tolist(), count.tolist()):
            summary = self._summary(row)
            handoffs = [copied[i] for i in range(f, f + c)]
            for i, handoff in zip(range(f, f + c), handoffs):
                handoff.from_agent, handoff.to_agent = from_agents[i], to_agents[i]
            out[summary.number] = _CopiedProblem(
                ProblemRecord(summary.number, summary.question, summary.gold, summary.prediction, summary.correct),
                handoffs)
        return out

    def _copy_block(self, indices: np.ndarray, spans: dict, into: dict) -> None:
        """Read the rows hand-offs `indices` cover, one slice per dataset, and keep each hand-off's views in `into`."""
        d = self._datasets

        def covering(table):
            first, count = spans[table]
            used = count > 0
            return (int(first[used].min()), int((first + count)[used].max())) if used.any() else (0, 0)

        c0, c1 = covering("columns")
        s0, s1 = covering("segments")
        r0, r1 = covering("readout")
        columns = {"sims": d[("columns", "layer_similarities")][:, c0:c1],
                   "position": d[("columns", "position")][c0:c1],
                   "token": _checked_texts(d[("columns", "token")][c0:c1], "/columns/token")}
        segments = {name: d[("segments", name)][s0:s1] for name in ("start", "stop")}
        for name in ("agent", "kind"):
            segments[name] = _checked_texts(d[("segments", name)][s0:s1], f"/segments/{name}")
        readout = {}
        if r1 > r0:
            for name, (dtype, _) in _READOUT.items():
                values = d[("readout", name)][..., r0:r1]
                readout[name] = _checked_texts(values, f"/readout/{name}") if dtype is _STR else values
        for j, index in enumerate(indices.tolist()):
            fc, nc = (int(x[j]) for x in spans["columns"])
            fs, ns = (int(x[j]) for x in spans["segments"])
            fr, nr = (int(x[j]) for x in spans["readout"])
            cols, segs, outs = slice(fc - c0, fc - c0 + nc), slice(fs - s0, fs - s0 + ns), slice(fr - r0, fr - r0 + nr)
            into[index] = _CopiedHandoff(
                "", "", columns["sims"][:, cols], columns["position"][cols], columns["token"][cols],
                {name: segments[name][segs] for name in ("agent", "kind", "start", "stop")},
                {name: values[..., outs] for name, values in readout.items()} if nr else None)

    def _committed_readout(self) -> tuple[dict, dict]:
        """The committed hand-offs' readout as schema 3 stores it, for a resume to copy: ({first_readout,
        num_readouts} of each hand-off, /readout's datasets' committed values), whatever this file's schema."""
        h = self._handoff_table
        if self._schema >= 3:
            count = self._readout_committed
            return ({name: h[name] for name, _ in _READOUT_RANGE},
                    {name: self._datasets[("readout", name)][..., :count] for name in _READOUT})
        readouts = [self._readout(slice(int(f), int(f) + int(w))).rows()
                    for f, w in zip(h["first_column"], h["num_columns"])]
        for index, rows in enumerate(readouts):  # what schema 3 refuses on opening must not be copied into it
            problem = rows.problem()
            if problem:
                raise ValueError(f"its schema-2 readout cannot be converted: hand-off {index}: {problem}")
        counts = np.array([len(r.column) for r in readouts], dtype=np.int64)
        return ({"first_readout": np.cumsum(counts) - counts, "num_readouts": counts},
                _stack_rows(readouts, self._readout_k))

    def _readout(self, cols: slice) -> LatentReadout:
        """Schema 2: the readout of columns `cols`, one entry per column in /columns."""
        d = self._datasets
        tokens = d[("columns", "readout_token")][:, cols].T
        return LatentReadout(
            step=d[("columns", "readout_step")][cols].astype(np.int64),
            ids=d[("columns", "readout_id")][:, cols].T.astype(np.int64),
            tokens=[[_decode(t, "/columns/readout_token") for t in row] for row in tokens],
            probs=d[("columns", "readout_prob")][:, cols].T.astype(np.float32),
            entropy=d[("columns", "readout_entropy")][cols].astype(np.float32),
            realign_cosine=d[("columns", "realign_cosine")][cols].astype(np.float32),
            realign_token=[_decode(t, "/columns/realign_token") for t in d[("columns", "realign_token")][cols]],
        )

    def __repr__(self) -> str:
        if not self._file.id.valid:
            return f"<CaptureReader {str(self.path)!r} (closed)>"
        model = self.attrs.get("model_name") or "?"
        state = "finished" if self.finished_at else "unfinished"
        return (f"<CaptureReader {str(self.path)!r}: model {model!r}, {len(self._numbers)} problems, "
                f"{self.num_layers} layers, {state}>")

    def problems_table(self):
        """A `pandas.DataFrame` of the problems, one row each, with T per hand-off (`[notebook]`)."""
        from .tables import problems_table

        return problems_table(self)


@dataclass
class _CopiedHandoff:
    """One hand-off's rows as a file stores them (read by `CaptureReader.copied_rows`).

    sims: [num_layers, T]; position: [T]; token: T raw strings; segments: name -> [G] values of
    /segments; readout: name -> [R] or [k, R] values of /readout (None: no rows).
    """

    from_agent: str
    to_agent: str
    sims: np.ndarray
    position: np.ndarray
    token: np.ndarray
    segments: dict[str, np.ndarray]
    readout: dict[str, np.ndarray] | None

    @property
    def width(self) -> int:
        return int(self.sims.shape[1])


@dataclass
class _CopiedProblem:
    """A problem's row (`record`, its `handoffs` empty) and its hand-offs' stored rows."""

    record: ProblemRecord
    handoffs: list[_CopiedHandoff]

    def nbytes(self, itemsize: int) -> int:
        """About what writing it adds to a file (uncompressed, with string heaps)."""
        return sum(2 * h.sims.size * itemsize + 56 * h.width + 64 * len(h.segments["start"])
                   + (0 if h.readout is None else 64 * h.readout["token"].size) for h in self.handoffs) \
            + 4 * (len(self.record.question) + len(self.record.gold) + len(self.record.prediction or "")) + 256


_COPY_SLACK = {"columns": _COLUMN_CHUNK, "segments": _ROW_CHUNK, "readout": _ROW_CHUNK}


def _blocks(spans: dict[str, tuple[np.ndarray, np.ndarray]], start: int, stop: int):
    """Slices of hand-offs [start, stop) (places in `spans`) whose covering rows, in every table, are at
    most about twice the rows they use. spans: table -> (first row [H], rows [H]) of each hand-off."""
    if stop <= start:
        return
    fits = True
    for table, (first, count) in spans.items():
        first, count = first[start:stop], count[start:stop]
        used = count > 0
        if used.any() and int((first + count)[used].max() - first[used].min()) > 2 * int(count.sum()) + \
                _COPY_SLACK[table]:
            fits = False
            break
    if fits or stop - start == 1:
        yield slice(start, stop)
        return
    middle = (start + stop) // 2
    yield from _blocks(spans, start, middle)
    yield from _blocks(spans, middle, stop)


def _checked_texts(values: np.ndarray, where: str) -> np.ndarray:
    """Strings read raw from a string dataset, returned as they are once each is known to be valid UTF-8.

    One decode of them all, joined by an ASCII separator (a sequence broken in one value cannot be
    completed by the next); on failure `_decode_all` names the first bad one (raises _BadText).
    """
    flat = values.ravel().tolist()
    try:
        b"\x1f".join(flat).decode("utf-8")
    except TypeError:  # str values (already text)
        return values
    except UnicodeDecodeError:
        _decode_all(flat, where)
    return values


def number_ranges(numbers: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    if not numbers:
        return "no problems"
    numbers = sorted(numbers)
    parts, start, prev = [], numbers[0], numbers[0]
    for n in list(numbers[1:]) + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)
