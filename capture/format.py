"""The capture file: its HDF5 layout, a streaming writer and a reader.

This is the only module that knows the layout (documented for humans in
`docs/capture-format.md`). It needs h5py and numpy only, never torch, so the
renderer can read captures on a laptop.

Layout (schema 1). Every dataset is one-dimensional, chunked and resizable
along its row axis, except the similarity matrix, which grows along columns::

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
    /columns/layer_similarities  float16|float32 [num_layers, C]
    /columns/position          int64 [C]   original cache position (kNN leaves gaps)
    /columns/token             str   [C]   token text; latent steps read "<latent>"
    /segments/agent            str   [G]
    /segments/kind             str   [G]   "prompt" or "latent"
    /segments/start            int64 [G]   first column, relative to its hand-off
    /segments/stop             int64 [G]   one past the last column
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
rows are flushed: a problem in flight at a crash is simply not there. Problems
solved together in one batch are committed together; their hand-offs may be
written (`stage`) before their results are known and the batch committed after.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .handoff_list import HandoffList
from .text import shorten

SCHEMA_VERSION = 1
LATENT_TOKEN = "<latent>"
SEGMENT_KINDS = ("prompt", "latent")

_STR = h5py.string_dtype("utf-8")
_ROW_CHUNK = 4096
_COLUMN_CHUNK = 1024
_COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)

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


class CaptureError(Exception):
    """A capture file that cannot be read or written; the message is one line."""


class CaptureConfigMismatch(CaptureError):
    """Resuming a capture with a configuration other than the one it was started with."""


@dataclass
class Segment:
    """Columns [start, stop) of a hand-off that come from one agent's prompt or latent steps."""

    agent: str
    kind: str
    start: int
    stop: int


@dataclass
class Handoff:
    """What one agent reads from the shared cache when the previous one hands over.

    layer_similarities: [num_layers, T] float, one row per layer, one column per cached token.
    positions: [T] int, each column's original cache position.
    tokens: T strings, `LATENT_TOKEN` for latent steps.
    """

    from_agent: str
    to_agent: str
    layer_similarities: np.ndarray
    positions: np.ndarray
    tokens: list[str]
    segments: list[Segment] = field(default_factory=list)

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


@dataclass
class StagedHandoffs:
    """Hand-offs written past the committed rows by `CaptureWriter.stage`, awaiting their problems.

    base: the committed counts `[problems, handoffs, columns, segments]` they were staged on;
    num_handoffs: hand-offs per problem, in order; end: `[handoffs, columns, segments]` after them.
    """

    base: list[int]
    num_handoffs: list[int]
    end: list[int]


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


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def superblock_eof(path: Path) -> int | None:
    """The end-of-file address an HDF5 file's superblock (at offset 0) records, or None if unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(96)
    except OSError:
        return None
    if not head.startswith(_HDF5_SIGNATURE) or len(head) < 16:
        return None
    version = head[8]
    if version in (0, 1):
        size, base_at = head[13], (24 if version == 0 else 28)
    elif version in (2, 3):
        size, base_at = head[9], 12
    else:
        return None
    if size not in (2, 4, 8) or len(head) < base_at + 3 * size:
        return None
    base = int.from_bytes(head[base_at:base_at + size], "little")
    return base + int.from_bytes(head[base_at + 2 * size:base_at + 3 * size], "little")


def _refuse_truncated(path: Path) -> None:
    """Raise if the file is shorter than its superblock says.

    Needed before an SWMR open, which skips HDF5's own end-of-file check (reads past
    the end then retry for minutes). A live writer can lag its superblock for a
    moment, so a short file is looked at again before it is refused.
    """
    stored = superblock_eof(path)
    for attempt in range(4):
        if stored is None:
            return
        size = path.stat().st_size
        if size >= stored:
            return
        if attempt == 3:
            raise CaptureError(f"{path} is truncated ({size:,} of {stored:,} bytes) and cannot be read")
        time.sleep(0.25)
        stored = superblock_eof(path)


def _open_for_reading(path: Path) -> h5py.File:
    """Open a capture read-only; a file still being written (or whose writer died) opens in SWMR mode."""
    if not path.exists():
        raise CaptureError(f"capture file not found: {path}")
    if not h5py.is_hdf5(path):
        raise CaptureError(f"{path} is not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as plain_error:
        _refuse_truncated(path)
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError:
            raise CaptureError(f"{path} is damaged or truncated and cannot be read ({plain_error})") from None


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

    Use `CaptureWriter.open(path, run_attrs, config, num_layers)`: it creates the
    file, or resumes it when it exists (refusing a different `config`, or other problems).
    """

    def __init__(self, file: h5py.File, path: Path):
        self._file = file
        self.path = path
        self._committed = [int(x) for x in file["status/committed"][:]]
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
    ) -> "CaptureWriter":
        """Create `path`, or resume it if it holds a capture of the same `config` (and `questions`).

        run_attrs: metadata stored as root attributes (JSON-able scalars).
        config: the settings that must match to resume (compared as JSON).
        questions: number -> question of the run; a stored problem with another question refuses
            the resume (`check_same_problems`), before anything is copied.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CaptureError(f"cannot create the folder for {path}: {error.strerror or error}") from None
        if path.exists() and not overwrite:
            return cls._resume(path, config, questions)
        return cls._create(path, path, run_attrs, config, num_layers, dtype)

    @classmethod
    def _create(cls, path: Path, final_path: Path, run_attrs, config, num_layers, dtype, source=None):
        try:
            file = h5py.File(path, "w", libver="latest")
        except OSError as error:
            raise CaptureError(f"cannot write capture file {final_path}: {error}") from None
        try:
            attrs = dict(run_attrs)
            attrs["schema_version"] = SCHEMA_VERSION
            attrs["config"] = json.dumps(config, sort_keys=True)
            for key, value in attrs.items():
                file.attrs[key] = "" if value is None else value
            committed = _copy_committed(source, file, num_layers, dtype)
            status = file.create_group("status")
            status.create_dataset("committed", data=np.asarray(committed, dtype=np.int64))
            status.create_dataset("finished_at", data=[""], dtype=_STR)
            status.create_dataset("summary", data=[""], dtype=_STR)
            file.swmr_mode = True
            file.flush()
        except OSError as error:
            file.close()
            raise CaptureError(f"cannot write capture file {final_path}: {error}") from None
        return cls(file, final_path)

    @classmethod
    def _resume(cls, path: Path, config: dict, questions: dict[int, str] | None) -> "CaptureWriter":
        """Rebuild the file from its committed rows (a crashed writer leaves it locked) and go on."""
        with CaptureReader(path) as old:
            check_same_config(path, old.config, config)
            if questions:
                check_same_problems(path, old.questions(), questions)
            run_attrs = {k: v for k, v in old.attrs.items() if k not in ("schema_version", "config")}
            tmp = path.with_name(path.name + ".resume-tmp")
            writer = cls._create(tmp, path, run_attrs, config, old.num_layers, old.similarity_dtype, source=old)
        os.replace(tmp, path)
        return writer

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
        try:
            return self._stage(handoffs)
        except (OSError, ValueError, TypeError) as error:
            raise CaptureError(f"could not write {_problems_named(numbers)} to {self.path}: {error}") from None

    def commit(self, staged: StagedHandoffs, problems: Sequence[ProblemRecord]) -> None:
        """Write `problems` (whose hand-offs are `staged`, in order) and make them visible at once."""
        if len(problems) != len(staged.num_handoffs) or staged.base != self._committed:
            raise CaptureError(f"{self.path}: the staged hand-offs do not belong to these {len(problems)} problems "
                               "or to the file's current state")
        try:
            self._commit(staged, problems)
        except (OSError, ValueError, TypeError) as error:
            raise CaptureError(f"could not write {_problems_named([p.number for p in problems])} to {self.path}: "
                               f"{error}") from None
        self.completed_numbers.update(p.number for p in problems)

    def _stage(self, per_problem: Sequence[Sequence[Handoff]]) -> StagedHandoffs:
        _, n_handoffs, n_columns, n_segments = self._committed
        f = self._file
        handoff_rows = {"from_agent": [], "to_agent": [], "first_column": [], "num_columns": [],
                        "first_segment": [], "num_segments": []}
        segment_rows = {"agent": [], "kind": [], "start": [], "stop": []}
        column, segment = n_columns, n_segments
        matrices, positions, tokens = [], [], []
        for handoffs in per_problem:
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
                positions.append(np.asarray(handoff.positions, dtype=np.int64))
                tokens.extend(handoff.tokens)
                column += width
                segment += len(handoff.segments)
        sims = f["columns/layer_similarities"]
        if matrices:
            block = np.concatenate(matrices, axis=1).astype(sims.dtype)
            sims.resize(column, axis=1)
            sims[:, n_columns:column] = block
            _append_rows(f["columns/position"], n_columns, np.concatenate(positions))
            _append_rows(f["columns/token"], n_columns, tokens)
        for name, rows in handoff_rows.items():
            _append_rows(f[f"handoffs/{name}"], n_handoffs, rows)
        for name, rows in segment_rows.items():
            _append_rows(f[f"segments/{name}"], n_segments, rows)
        f.flush()  # rows reach the disk before the commit marker that makes them visible
        return StagedHandoffs(base=list(self._committed), num_handoffs=[len(h) for h in per_problem],
                              end=[n_handoffs + len(handoff_rows["from_agent"]), column, segment])

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
        self._file.flush()
        self._committed = [n_problems + len(problems), *staged.end]
        self._file["status/committed"][:] = self._committed
        self._file.flush()

    def finish(self, finished_at: str, summary: dict) -> None:
        """Mark the run finished and store its summary (JSON)."""
        try:
            self._file["status/finished_at"][0] = finished_at
            self._file["status/summary"][0] = json.dumps(summary, sort_keys=True)
            self._file.flush()
        except OSError as error:
            raise CaptureError(f"could not finish {self.path}: {error}") from None


def _problems_named(numbers: Sequence[int]) -> str:
    if not numbers:
        return "hand-offs"
    return ("problem " if len(numbers) == 1 else "problems ") + ", ".join(str(n) for n in numbers)


def _append_rows(dataset: h5py.Dataset, start: int, rows) -> None:
    stop = start + len(rows)
    if stop == start:
        return
    dataset.resize(stop, axis=dataset.ndim - 1)
    dataset[start:stop] = rows


def _copy_committed(source: "CaptureReader | None", file: h5py.File, num_layers: int, dtype: str) -> list[int]:
    """Create every table in `file`, filled with the committed rows of `source` (if any)."""
    committed = source.committed if source is not None else [0, 0, 0, 0]
    for group_name, columns in _TABLES.items():
        group = file.require_group(group_name)
        rows = committed[_COMMIT_ORDER.index(group_name)]
        for name, dt in columns:
            data = source._file[f"{group_name}/{name}"][:rows] if source is not None else np.zeros(0, dtype=dt)
            ds = group.create_dataset(name, shape=(rows,), maxshape=(None,), dtype=dt,
                                      chunks=(_ROW_CHUNK,), **_COMPRESSION)
            if rows:
                ds[:] = data
    n_columns = committed[2]
    sims = file["columns"].create_dataset(
        "layer_similarities", shape=(num_layers, n_columns), maxshape=(num_layers, None), dtype=dtype,
        chunks=(num_layers, _COLUMN_CHUNK), **_COMPRESSION)
    if n_columns:
        sims[:] = source._file["columns/layer_similarities"][:, :n_columns]
    return list(committed)




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


class CaptureReader(_OpenFile):
    """Read-only view of the committed part of a capture file.

    >>> with CaptureReader("captures/run.h5") as capture:
    ...     for handoff in capture.handoffs(problem=1):
    ...         handoff.layer_similarities  # [num_layers, T]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _open_for_reading(self.path)
        try:
            self._check_schema()
            # Read the commit marker before touching the tables, so a file still being
            # written never shows rows beyond it.
            self.committed = [int(x) for x in self._file["status/committed"][:]]
            count = self.committed[0]
            self._numbers = self._file["problems/number"][:count].astype(int)
        except KeyError as error:
            self._file.close()
            raise CaptureError(f"{self.path} is not a LatentMAS capture (missing {error})") from None
        except OSError as error:
            self._file.close()
            raise CaptureError(f"{self.path} is damaged or truncated and cannot be read ({error})") from None
        self._row_of = {int(n): i for i, n in enumerate(self._numbers)}

    def _check_schema(self) -> None:
        version = self._file.attrs.get("schema_version")
        if version is None:
            raise CaptureError(f"{self.path} is not a LatentMAS capture (no schema_version attribute)")
        if int(version) != SCHEMA_VERSION:
            raise CaptureError(
                f"{self.path} uses capture schema {int(version)}; this version of latentmas reads schema "
                f"{SCHEMA_VERSION}")

    # -- run metadata ------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return {k: (_decode(v) if isinstance(v, (bytes, str)) else v.item() if hasattr(v, "item") else v)
                for k, v in self._file.attrs.items()}

    @property
    def config(self) -> dict:
        return json.loads(_decode(self._file.attrs["config"]))

    @property
    def num_layers(self) -> int:
        return int(self._file["columns/layer_similarities"].shape[0])

    @property
    def similarity_dtype(self) -> str:
        return str(self._file["columns/layer_similarities"].dtype)

    @property
    def finished_at(self) -> str:
        return _decode(self._file["status/finished_at"][0])

    @property
    def summary(self) -> dict:
        text = _decode(self._file["status/summary"][0])
        return json.loads(text) if text else {}

    # -- problems and hand-offs ----------------------------------------------------
    @property
    def problem_numbers(self) -> list[int]:
        """Numbers of the committed problems, in the order they were written."""
        return [int(n) for n in self._numbers]

    def questions(self) -> dict[int, str]:
        """number -> question of every committed problem."""
        stored = self._file["problems/question"][:len(self._numbers)]
        return {int(n): _decode(q) for n, q in zip(self._numbers, stored)}

    def problem(self, number: int) -> ProblemSummary:
        row = self._row(number)
        p = self._file["problems"]
        first, count = int(p["first_handoff"][row]), int(p["num_handoffs"][row])
        h = self._file["handoffs"]
        names = [handoff_name(_decode(a), _decode(b))
                 for a, b in zip(h["from_agent"][first:first + count], h["to_agent"][first:first + count])]
        correct = int(p["correct"][row])
        return ProblemSummary(
            number=number, question=_decode(p["question"][row]), gold=_decode(p["gold"][row]),
            prediction=_decode(p["prediction"][row]), correct=None if correct < 0 else bool(correct),
            handoff_names=names, handoff_columns=[int(t) for t in h["num_columns"][first:first + count]])

    def handoffs(self, problem: int, which: Sequence[int] | None = None) -> HandoffList:
        """The hand-offs of one problem, in run order, each read (with its matrix) when first used.

        which: their 0-based places in the problem's run order, to read only those (default: all).
        A list-like (`len`, `[i]`, `for`) that is also an iterator (`next`): see `HandoffList`.
        """
        row = self._row(problem)
        first = int(self._file["problems/first_handoff"][row])
        count = int(self._file["problems/num_handoffs"][row])
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

    def _handoff(self, index: int) -> Handoff:
        h = self._file["handoffs"]
        first, width = int(h["first_column"][index]), int(h["num_columns"][index])
        seg_first, seg_count = int(h["first_segment"][index]), int(h["num_segments"][index])
        s = self._file["segments"]
        segments = [
            Segment(_decode(a), _decode(k), int(b), int(e))
            for a, k, b, e in zip(s["agent"][seg_first:seg_first + seg_count],
                                  s["kind"][seg_first:seg_first + seg_count],
                                  s["start"][seg_first:seg_first + seg_count],
                                  s["stop"][seg_first:seg_first + seg_count])
        ]
        c = self._file["columns"]
        return Handoff(
            from_agent=_decode(h["from_agent"][index]),
            to_agent=_decode(h["to_agent"][index]),
            layer_similarities=c["layer_similarities"][:, first:first + width],
            positions=c["position"][first:first + width],
            tokens=[_decode(t) for t in c["token"][first:first + width]],
            segments=segments,
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
