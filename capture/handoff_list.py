"""`HandoffList`: the hand-offs of one problem, read from the file on first use.

What `CaptureReader.handoffs(problem)` returns. It is a sequence (`len`, indexing,
slicing, iteration, `list(...)`) whose items are read when first asked for and kept,
and also an iterator (`next(...)` hands out the items in order, one read at a time),
so a caller can stop at the first unreadable hand-off without reading the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Iterator


class HandoffList(Sequence):
    """The hand-offs at `rows` (their places in the file), read by `read(row)` on first access.

    names: their names ('planner_to_critic', ...), known without reading a matrix; shown by repr.
    """

    def __init__(self, rows: Sequence[int], read: Callable[[int], object], names: Sequence[str] = (),
                 problem: int | None = None):
        self._rows = list(rows)
        self._read = read
        self._items: dict[int, object] = {}
        self._next = 0
        self.names = list(names)
        self.problem = problem

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"hand-off {index} out of range (this problem has {len(self)} selected)")
        index %= len(self)
        if index not in self._items:
            self._items[index] = self._read(self._rows[index])
        return self._items[index]

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(len(self)))

    def __next__(self):
        if self._next >= len(self):
            raise StopIteration
        item = self[self._next]
        self._next += 1
        return item

    def __repr__(self) -> str:
        about = f"problem {self.problem}: " if self.problem is not None else ""
        return f"<{len(self)} hand-offs of {about}{', '.join(self.names) or '(none)'}>"
