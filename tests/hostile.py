"""Hostile capture files: a generator of damaged, inconsistent and crafted files, one per case.

`make_case(name, folder, canary)` writes `folder/<name>.h5` and returns it. `canary` is a
file outside the capture (a text file with CANARY_TEXT, and `canary.h5` next to it) that
crafted links and storage point at: a safe reader never opens it. Cases in REFUSED must
give a one-line error; cases in ACCEPTED open, with their hostile text shown as text.
Imported by tests (pytest puts tests/ on sys.path); needs h5py and numpy only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from capture.format import CaptureWriter, Handoff, ProblemRecord, Segment

CANARY_TEXT = "CANARY-7f3a-outside-the-capture"
ESCAPES = "\x1b]0;window-title\x07\x1b[2J\x1b]8;;http://example.invalid\x1b\\link\x1b]8;;\x1b\\"
STR = h5py.string_dtype("utf-8")


def make_canaries(folder: Path) -> Path:
    """A text canary (and canary.h5 holding it as datasets) that no read of a capture may open."""
    canary = folder / "canary.txt"
    canary.write_text((CANARY_TEXT + "\n") * 64)
    with h5py.File(folder / "canary.h5", "w") as f:
        f.create_dataset("text", data=[CANARY_TEXT] * 64, dtype=STR)
        f["numbers"] = np.arange(64, dtype=np.int64)
    fifo = folder / "canary.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    return canary


def valid_capture(path: Path, model_name: str = "toy", question: str = "What is 2 + 2?", matrix=None) -> Path:
    """Two problems of two hand-offs (6 and 9 columns over 3 layers), written by CaptureWriter, finished."""
    rng = np.random.default_rng(0)
    with CaptureWriter.open(path, {"model_name": model_name, "method": "latent_mas"}, {"k": 1}, num_layers=3,
                            dtype="float32", overwrite=True, durable=False) as writer:
        for number in (1, 2):
            handoffs = []
            for width, (a, b) in zip((6, 9), (("planner", "critic"), ("critic", "judger"))):
                values = rng.uniform(-1, 1, (3, width)) if matrix is None else matrix(width)
                handoffs.append(Handoff(a, b, values, np.arange(width), [f"t{i}" for i in range(width)],
                                        [Segment(a, "prompt", 0, width - 2), Segment(a, "latent", width - 2, width)]))
            writer.append(ProblemRecord(number, question, "4", "4", True, handoffs))
        writer.finish("2025-01-01T00:00:00", {"total": 2})
    return path


def _replace(f: h5py.File, name: str, **create) -> None:
    del f[name]
    f.create_dataset(name, **create)


def _flip(path: Path, needle: bytes, occurrence: int = 0) -> None:
    data = bytearray(path.read_bytes())
    at = -1
    for _ in range(occurrence + 1):
        at = data.index(needle, at + 1)
    data[at] ^= 0x20
    path.write_bytes(bytes(data))


def _bomb(path: Path) -> None:
    """A small file declaring 10^10 columns (74.5 GiB of float16 over 4 layers)."""
    huge = 10 ** 10
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1
        f.attrs["config"] = "{}"
        for group, columns in (("problems", (("number", "i4"), ("question", STR), ("gold", STR), ("prediction", STR),
                                              ("correct", "i1"), ("first_handoff", "i8"), ("num_handoffs", "i4"))),
                               ("handoffs", (("from_agent", STR), ("to_agent", STR), ("first_column", "i8"),
                                             ("num_columns", "i8"), ("first_segment", "i8"), ("num_segments", "i4"))),
                               ("segments", (("agent", STR), ("kind", STR), ("start", "i8"), ("stop", "i8")))):
            g = f.create_group(group)
            for name, dt in columns:
                g.create_dataset(name, shape=(1,), dtype=dt)
        f["problems/number"][0] = 1
        f["problems/num_handoffs"][0] = 1
        f["handoffs/from_agent"][0] = "a"
        f["handoffs/to_agent"][0] = "b"
        f["handoffs/num_columns"][0] = huge
        c = f.create_group("columns")
        c.create_dataset("layer_similarities", shape=(4, huge), dtype="f2", chunks=(4, 1024), maxshape=(4, None))
        c.create_dataset("position", shape=(huge,), dtype="i8", chunks=(4096,), maxshape=(None,))
        c.create_dataset("token", shape=(huge,), dtype=STR, chunks=(4096,), maxshape=(None,))
        s = f.create_group("status")
        s["committed"] = np.array([1, 1, huge, 0], dtype=np.int64)
        s.create_dataset("finished_at", data=[""], dtype=STR)
        s.create_dataset("summary", data=[""], dtype=STR)


def _edit(edit):
    """A case that writes a valid capture, then changes it with h5py (`edit(f, folder)`)."""
    def make(path: Path, folder: Path) -> None:
        valid_capture(path)
        with h5py.File(path, "r+") as f:
            edit(f, folder)
    return make


def _set(name, value):
    def edit(f, folder):
        f[name][...] = value
    return _edit(edit)


def _truncate(size):
    def make(path: Path, folder: Path) -> None:
        valid_capture(path)
        with open(path, "r+b") as f:
            f.truncate(size if size > 0 else path.stat().st_size // 2)
    return make


def _bad_utf8(name):
    def edit(f, folder):
        values = f[name][:]
        values[0] = b"caf\xc3(\xff"
        del f[name]
        f.create_dataset(name, data=values, dtype=h5py.string_dtype("ascii"))
    return _edit(edit)


CASES = {
    # data outside the file
    "external_storage": _edit(lambda f, d: _replace(f, "columns/token", shape=(18,), dtype="S16",
                                                    external=[(str(d / "canary.txt"), 0, 16 * 18)])),
    "external_storage_matrix": _edit(lambda f, d: _replace(f, "columns/position", shape=(30,), dtype="i8",
                                                           external=[(str(d / "canary.txt"), 0, 8 * 30)])),
    "external_storage_fifo": _edit(lambda f, d: _replace(f, "columns/position", shape=(30,), dtype="i8",
                                                         external=[(str(d / "canary.fifo"), 0, 8 * 30)])),
    "external_link": _edit(lambda f, d: (f.__delitem__("columns/token"),
                                         f["columns"].__setitem__("token", h5py.ExternalLink(str(d / "canary.h5"),
                                                                                             "/text")))),
    "external_link_group": _edit(lambda f, d: (f.__delitem__("segments"),
                                               f.__setitem__("segments", h5py.ExternalLink(str(d / "canary.h5"), "/")))),
    "external_link_fifo": _edit(lambda f, d: (f.__delitem__("columns/token"),
                                              f["columns"].__setitem__("token", h5py.ExternalLink(
                                                  str(d / "canary.fifo"), "/text")))),
    "virtual_dataset": _edit(lambda f, d: _virtual(f, d)),
    "soft_link": _edit(lambda f, d: (f.create_dataset("elsewhere", data=["x"] * 2, dtype=STR),
                                     f.__delitem__("problems/question"),
                                     f["problems"].__setitem__("question", h5py.SoftLink("/elsewhere")))),
    "soft_link_loop": _edit(lambda f, d: (f.__delitem__("handoffs"), f.__setitem__("handoffs", h5py.SoftLink("/handoffs")))),
    "filter_plugin": _edit(lambda f, d: _replace(f, "columns/position", shape=(30,), dtype="i8", chunks=(30,),
                                                 compression=32123, allow_unknown_filter=True)),
    # allocation bomb
    "bomb_1e10_columns": lambda path, d: _bomb(path),
    # inconsistent tables
    "column_range_outside_data": _set("handoffs/first_column", [0, 6, 15, 200]),
    "num_columns_beyond_data": _set("handoffs/num_columns", [6, 9, 6, 90]),
    "duplicate_problem_numbers": _set("problems/number", [1, 1]),
    "committed_negative": _set("status/committed", [-1, 4, 30, 8]),
    "committed_beyond_tables": _set("status/committed", [5, 4, 30, 8]),
    "handoff_range_outside": _set("problems/first_handoff", [0, 3]),
    "segment_outside_handoff": _set("segments/stop", [4, 6, 7, 9, 4, 60, 7, 9]),
    "correct_out_of_range": _set("problems/correct", [1, 7]),
    # text
    "bad_utf8_agent": _bad_utf8("handoffs/from_agent"),
    "bad_utf8_question": _bad_utf8("problems/question"),
    # schema
    "schema_version_text": _edit(lambda f, d: f.attrs.__setitem__("schema_version", "abc")),
    "schema_version_array": _edit(lambda f, d: f.attrs.__setitem__("schema_version", [1, 1])),
    "root_attribute_array": _edit(lambda f, d: f.attrs.__setitem__("model_name", np.arange(3))),
    "no_schema_version": _edit(lambda f, d: f.attrs.__delitem__("schema_version")),
    "config_not_json": _edit(lambda f, d: f.attrs.__setitem__("config", "{not json")),
    "scalar_committed": _edit(lambda f, d: _replace(f, "status/committed", data=np.int64(2))),
    "float_committed": _edit(lambda f, d: _replace(f, "status/committed", data=np.zeros(4))),
    "group_for_dataset": _edit(lambda f, d: (f.__delitem__("problems/number"), f.create_group("problems/number"))),
    "dataset_for_group": _edit(lambda f, d: (f.__delitem__("segments"), f.create_dataset("segments", data=[1]))),
    "matrix_rank_3": _edit(lambda f, d: _replace(f, "columns/layer_similarities", data=np.zeros((3, 30, 1), "f4"))),
    "matrix_int_dtype": _edit(lambda f, d: _replace(f, "columns/layer_similarities", data=np.zeros((3, 30), "i4"))),
    "number_as_string": _edit(lambda f, d: _replace(f, "problems/number", data=["1", "2"], dtype=STR)),
    "missing_table": _edit(lambda f, d: f.__delitem__("columns/token")),
    # damage
    "truncated_11": _truncate(11),
    "truncated_20": _truncate(20),
    "truncated_32": _truncate(32),
    "truncated_half": _truncate(0),
    "empty_file": lambda path, d: path.write_bytes(b""),
    "not_hdf5": lambda path, d: path.write_text("hello, not a capture\n"),
    "superblock_checksum": lambda path, d: (valid_capture(path), _flip_superblock(path)),
    "attribute_name_checksum": lambda path, d: (valid_capture(path), _flip(path, b"model_name")),
}


def _flip_superblock(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[44] ^= 0xFF  # the checksum of a version 2/3 superblock with 8-byte addresses: bytes 44..47
    path.write_bytes(bytes(data))


def _virtual(f: h5py.File, folder: Path) -> None:
    layout = h5py.VirtualLayout(shape=(30,), dtype="i8")
    layout[0:30] = h5py.VirtualSource(str(folder / "canary.h5"), "numbers", shape=(64,))[0:30]
    del f["columns/position"]
    f["columns"].create_virtual_dataset("position", layout)


# Hostile text that must open, shown as text (terminal escapes replaced).
ACCEPTED = {
    "escape_sequences": lambda path, d: valid_capture(path, model_name="evil" + ESCAPES, question="q" + ESCAPES),
    "mathtext_model_name": lambda path, d: valid_capture(path, model_name=r"my $x^2$ model $\undefinedcmd$"),
    "infinite_cells": lambda path, d: valid_capture(path, matrix=lambda w: np.where(np.arange(w) % 3 == 0, np.inf,
                                                                                 -np.inf)[None].repeat(3, 0)),
}


def make_case(name: str, folder: Path) -> Path:
    """Write case `name` (of CASES or ACCEPTED) as `folder/<name>.h5` and return its path."""
    make_canaries(folder)
    path = folder / f"{name}.h5"
    (CASES.get(name) or ACCEPTED[name])(path, folder)
    lock = path.with_name(path.name + ".lock")
    if lock.exists():
        lock.unlink()
    shutil.rmtree(folder / "__pycache__", ignore_errors=True)
    return path
