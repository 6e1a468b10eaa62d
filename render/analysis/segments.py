"""Which segment (agent and kind) each column of a hand-off belongs to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNCOVERED = ("(none)", "uncovered")  # agent, kind of columns no segment covers


@dataclass(frozen=True)
class ColumnSegments:
    """A hand-off's columns mapped to its segments.

    labels: (agent, kind) of each segment, in column order, UNCOVERED last when some column is uncovered.
    index: [T] int, each column's place in `labels`.
    spans: [start, stop) columns of each label's columns; for UNCOVERED, (first, last + 1).
    """

    labels: tuple[tuple[str, str], ...]
    index: np.ndarray
    spans: tuple[tuple[int, int], ...]

    def label_of(self, column: int) -> tuple[str, str]:
        return self.labels[int(self.index[column])]


def column_segments(handoff) -> ColumnSegments:
    """Map each of `handoff`'s T columns to its segment; two segments of one agent and kind stay apart."""
    width = handoff.num_columns
    index = np.full(width, -1, dtype=np.int64)
    labels: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    for segment in sorted(handoff.segments, key=lambda s: s.start):
        start, stop = max(0, int(segment.start)), min(width, int(segment.stop))
        if stop <= start:
            continue
        index[start:stop] = len(labels)
        labels.append((segment.agent, segment.kind))
        spans.append((start, stop))
    uncovered = np.flatnonzero(index < 0)
    if len(uncovered):
        index[uncovered] = len(labels)
        labels.append(UNCOVERED)
        spans.append((int(uncovered[0]), int(uncovered[-1]) + 1))
    return ColumnSegments(tuple(labels), index, tuple(spans))
