"""Consistency of a capture's tables with each other, before anything is drawn from them.

Every function takes the committed rows as numpy arrays and raises `TableError` (one
line, naming the table and the first bad row) when they contradict each other, so a
damaged or crafted file is refused instead of drawn wrong. Numpy only: the HDF5 layout
stays in `capture.format`, which reads the arrays and calls these.
"""

from __future__ import annotations

import numpy as np

# The most bytes one read of a capture may allocate (a hand-off's matrix, a table column).
# A 19 KB file can declare 10^10 columns; this turns its read into a one-line refusal.
MAX_READ_BYTES = 4 << 30


class TableError(ValueError):
    """The tables of a capture contradict each other; the message is one line."""


def check_committed(committed: np.ndarray, lengths: dict[str, int], names=("problems", "handoffs", "columns",
                                                                               "segments")) -> list[int]:
    """The commit counter [4], within the rows every table of its group has. Returns it as ints.

    lengths: table name -> the fewest rows any dataset of that table holds.
    """
    if committed.shape != (4,) or committed.dtype.kind not in "iu":
        raise TableError(f"/status/committed is {committed.dtype} {list(committed.shape)}, not 4 integers")
    counts = [int(x) for x in committed]
    for name, count in zip(names, counts):
        if count < 0:
            raise TableError(f"/status/committed says {count} rows of {name}")
        if count > lengths[name]:
            raise TableError(f"/status/committed says {count:,} rows of {name}, but its tables hold "
                             f"{lengths[name]:,}")
    return counts


def check_read_size(what: str, count: int, bytes_per_row: int) -> None:
    """Refuse a read of `count` rows of `bytes_per_row` that would allocate more than MAX_READ_BYTES."""
    if count * bytes_per_row > MAX_READ_BYTES:
        raise TableError(f"{what} declares {count:,} rows ({count * bytes_per_row / 2**30:.1f} GiB), more than a "
                         f"reader allocates ({MAX_READ_BYTES / 2**30:.0f} GiB)")


def check_ranges(table: str, first: np.ndarray, count: np.ndarray, total: int, target: str) -> None:
    """Rows [first[i], first[i] + count[i]) of `target` lie inside its `total` committed rows."""
    first, count = first.astype(np.int64), count.astype(np.int64)
    bad = np.flatnonzero((first < 0) | (count < 0) | (first > total - count))
    if bad.size:
        i = int(bad[0])
        raise TableError(f"{table} row {i} points at {target} rows {int(first[i])}..{int(first[i]) + int(count[i])}, "
                         f"outside the {total:,} committed")


def check_problem_numbers(numbers: np.ndarray) -> None:
    """Problem numbers are unique (a duplicate would hide a problem)."""
    unique, counts = np.unique(numbers, return_counts=True)
    if (counts > 1).any():
        raise TableError(f"/problems/number holds problem {int(unique[counts > 1][0])} more than once")


def check_correct(correct: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isin(correct, (-1, 0, 1)))
    if bad.size:
        raise TableError(f"/problems/correct row {int(bad[0])} is {int(correct[bad[0]])}, not 1, 0 or -1")


def check_segments(first_segment: np.ndarray, num_segments: np.ndarray, num_columns: np.ndarray,
                   start: np.ndarray, stop: np.ndarray) -> None:
    """Every hand-off's segments lie inside its columns: 0 <= start <= stop <= T of that hand-off."""
    owners = np.repeat(np.arange(len(num_segments)), num_segments.astype(np.int64))
    offsets = np.arange(len(owners)) - np.repeat(np.cumsum(num_segments, dtype=np.int64) - num_segments,
                                                 num_segments.astype(np.int64))
    rows = first_segment.astype(np.int64)[owners] + offsets
    width = num_columns.astype(np.int64)[owners]
    s, e = start[rows].astype(np.int64), stop[rows].astype(np.int64)
    bad = np.flatnonzero((s < 0) | (s > e) | (e > width))
    if bad.size:
        i = int(bad[0])
        raise TableError(f"/segments row {int(rows[i])} covers columns {int(s[i])}..{int(e[i])} of hand-off "
                         f"{int(owners[i])}, which has {int(width[i])}")


def check_readout_rows(first_readout: np.ndarray, num_readouts: np.ndarray, num_columns: np.ndarray,
                       column: np.ndarray, step: np.ndarray) -> None:
    """Every hand-off's readout rows name columns of that hand-off, each at most once and in increasing order,
    with a latent step >= 0. first_readout, num_readouts, num_columns: [H]; column, step: [R], the rows covered."""
    counts = num_readouts.astype(np.int64)
    owners = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = first_readout.astype(np.int64)[owners] + offsets
    c, width = column[rows].astype(np.int64), num_columns.astype(np.int64)[owners]
    bad = np.flatnonzero((c < 0) | (c >= width))
    if bad.size:
        i = int(bad[0])
        raise TableError(f"/readout row {int(rows[i])} names column {int(c[i])} of hand-off {int(owners[i])}, "
                         f"which has {int(width[i])}")
    repeated = np.flatnonzero((offsets[1:] > 0) & (c[1:] <= c[:-1])) + 1
    if repeated.size:
        i = int(repeated[0])
        raise TableError(f"/readout row {int(rows[i])} names column {int(c[i])} of hand-off {int(owners[i])} "
                         f"after column {int(c[i - 1])} (a hand-off's rows go by increasing column)")
    negative = np.flatnonzero(step[rows] < 0)
    if negative.size:
        i = int(negative[0])
        raise TableError(f"/readout row {int(rows[i])} has latent step {int(step[rows[i]])}")
