"""What an analysis reads: one capture, the chosen problems and hand-offs, streamed one hand-off at a time.

Nothing here holds more than one hand-off's matrix: `stream` yields them in file order and the
caller folds each into its accumulators before the next is read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterator, Sequence

from capture.format import CaptureError, CaptureReader, Handoff, number_ranges


class AnalysisError(CaptureError):
    """An analysis or comparison that cannot go on; the message is one line."""


def parse_problems(spec) -> set[int] | None:
    """'1-5,9' -> {1, ..., 5, 9}; None or '' -> None (all). Raises AnalysisError."""
    from render.batch import parse_problem_spec

    try:
        return parse_problem_spec(spec)
    except ValueError as error:
        raise AnalysisError(str(error)) from None


def parse_names(spec) -> list[str] | None:
    """'planner_to_critic,critic_to_refiner' -> names; None, '' or 'all' -> None (all)."""
    from render.batch import parse_transitions

    return parse_transitions(spec)


@dataclass(frozen=True)
class Selection:
    """The problems (in file order) and, per problem, the hand-offs to read.

    handoffs: number -> tuple of (index in the problem's run order, label); the label is the
        hand-off's name, with '#2', '#3', ... when a name occurs again in one problem.
    """

    numbers: tuple[int, ...]
    handoffs: dict
    labels: tuple[str, ...]  # every label selected, in first-seen order
    warnings: tuple[str, ...] = ()

    @property
    def num_handoffs(self) -> int:
        return sum(len(v) for v in self.handoffs.values())


def handoff_labels(names: Sequence[str]) -> list[str]:
    """['a', 'b', 'a'] -> ['a', 'b', 'a#2']: a label per hand-off that is unique within its problem."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def select(reader: CaptureReader, problems: set[int] | None = None,
           transitions: Sequence[str] | None = None) -> Selection:
    """The problems and hand-offs of `reader` that match; raises AnalysisError when nothing does."""
    numbers = reader.problem_numbers
    if not numbers:
        raise AnalysisError(f"{reader.path} has no committed problems; nothing to analyse")
    warnings = []
    if problems is not None:
        missing = sorted(problems - set(numbers))
        chosen = [n for n in numbers if n in problems]
        if not chosen:
            raise AnalysisError(f"{reader.path} has no problem {number_ranges(sorted(problems))} "
                                f"(it holds {number_ranges(numbers)})")
        if missing:
            warnings.append(f"{reader.path}: no problem {number_ranges(missing)}")
        numbers = chosen
    wanted = set(transitions) if transitions is not None else None
    seen: list[str] = []
    handoffs = {}
    for number in numbers:
        names = reader.problem(number).handoff_names
        labels = handoff_labels(names)
        for name in names:
            if name not in seen:
                seen.append(name)
        handoffs[number] = tuple((i, label) for i, (name, label) in enumerate(zip(names, labels))
                                 if wanted is None or name in wanted)
    if wanted is not None:
        absent = sorted(wanted - set(seen))
        if len(absent) == len(wanted):
            close = difflib.get_close_matches(absent[0], seen, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AnalysisError(f"{reader.path} has no hand-off {', '.join(absent)}{hint} "
                                f"(it has {', '.join(seen) or 'none'})")
        if absent:
            warnings.append(f"{reader.path}: no hand-off {', '.join(absent)} in the selected problems")
    labels = []
    for chosen in handoffs.values():
        for _, label in chosen:
            if label not in labels:
                labels.append(label)
    return Selection(tuple(numbers), handoffs, tuple(labels), tuple(warnings))


def stream(reader: CaptureReader, selection: Selection, number: int) -> Iterator[tuple[str, Handoff]]:
    """(label, hand-off) of one problem's selected hand-offs, read one at a time, in run order."""
    chosen = selection.handoffs.get(number, ())
    if not chosen:
        return
    for (_, label), handoff in zip(chosen, reader.handoffs(number, [i for i, _ in chosen])):
        yield label, handoff


def still_writing_note(reader: CaptureReader) -> str | None:
    """A one-line note when the capture has no finish mark (still being written, or its run stopped)."""
    if reader.finished_at:
        return None
    count = len(reader.problem_numbers)
    return (f"note: {reader.path} is not finished (still being written, or its run stopped): analysing the "
            f"{count} problem{'s' if count != 1 else ''} committed so far")


def check_layer(reader: CaptureReader, layer: int | None) -> int:
    """The layer to use (default num_layers // 2, the one kNN filtering ranks by); AnalysisError when out of range."""
    num_layers = reader.num_layers
    if num_layers == 0:
        raise AnalysisError(f"{reader.path} has no layers")
    if layer is None:
        return num_layers // 2
    if not 0 <= layer < num_layers:
        raise AnalysisError(f"--layer {layer} is out of range: {reader.path} has {num_layers} layers "
                            f"(0 to {num_layers - 1})")
    return int(layer)
