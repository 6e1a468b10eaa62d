"""What an analysis reads: one capture, the chosen problems and hand-offs, streamed one hand-off at a time.

Nothing here holds more than one hand-off's matrix: `stream` yields them in file order and the
caller folds each into its accumulators before the next is read. `chunks` cuts the problems into
fixed blocks that worker processes read on their own (see `parallel.py`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence

from capture.format import CaptureError, CaptureReader, Handoff, number_ranges

CHUNK = 32  # problems per unit of work; fixed, so results never depend on the number of workers


class AnalysisError(CaptureError):
    """An analysis or comparison that cannot go on; the message is one line."""


def parse_problems(spec) -> set[int] | None:
    """'1-5,9' -> {1, ..., 5, 9}; None or '' -> None (all). Raises AnalysisError."""
    from capture.selection import parse_problem_spec

    try:
        return parse_problem_spec(spec)
    except ValueError as error:
        raise AnalysisError(str(error)) from None


def parse_names(spec) -> list[str] | None:
    """'planner_to_critic,critic_to_refiner' -> names; None, '' or 'all' -> None (all)."""
    from capture.selection import parse_transitions

    names = parse_transitions(spec)
    return None if names is None else list(names)


def handoff_labels(names: Sequence[str]) -> list[str]:
    """['a', 'b', 'a'] -> ['a', 'b', 'a#2']: a label per hand-off that is unique within its problem."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def select_problems(reader: CaptureReader, problems: set[int] | None = None) -> tuple[list[int], list[str]]:
    """(the committed problem numbers that match, in file order; warnings); AnalysisError when none does."""
    numbers = reader.problem_numbers
    if not numbers:
        raise AnalysisError(f"{reader.path} has no committed problems; nothing to analyse")
    if problems is None:
        return numbers, []
    chosen = [n for n in numbers if n in problems]
    if not chosen:
        raise AnalysisError(f"{reader.path} has no problem {number_ranges(sorted(problems))} "
                            f"(it holds {number_ranges(numbers)})")
    missing = sorted(problems - set(numbers))
    return chosen, [f"{reader.path}: no problem {number_ranges(missing)}"] if missing else []


def problem_handoffs(reader: CaptureReader, number: int, wanted: Sequence[str] | None) -> list[tuple[int, str, str]]:
    """(index in the run order, label, name) of one problem's hand-offs whose name is in `wanted` (all when None)."""
    names = reader.problem(number).handoff_names
    return [(i, label, name) for i, (name, label) in enumerate(zip(names, handoff_labels(names)))
            if wanted is None or name in wanted]


def check_names(path, wanted: Sequence[str] | None, seen: Sequence[str]) -> list[str]:
    """Warnings for names asked for but absent; AnalysisError when none of them is present."""
    if wanted is None:
        return []
    absent = [n for n in wanted if n not in seen]
    if len(absent) == len(wanted):
        close = difflib.get_close_matches(absent[0], list(seen), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AnalysisError(f"{path} has no hand-off {', '.join(absent)}{hint} (it has {', '.join(seen) or 'none'})")
    return [f"{path}: no hand-off {', '.join(absent)} in the selected problems"] if absent else []


def stream(reader: CaptureReader, number: int, wanted: Sequence[str] | None,
           seen: list[str] | None = None) -> Iterator[tuple[int, str, str, Handoff]]:
    """(index in the run order, label, name, hand-off) of one problem's wanted hand-offs, read one at a
    time, in run order. `seen` gets every hand-off name of the problem not in it yet (wanted or not)."""
    every = problem_handoffs(reader, number, None)
    if seen is not None:
        seen += [name for name in dict.fromkeys(n for _, _, n in every) if name not in seen]
    chosen = [entry for entry in every if wanted is None or entry[2] in wanted]
    if not chosen:
        return
    for (index, label, name), handoff in zip(chosen, reader.handoffs(number, [i for i, _, _ in chosen])):
        yield index, label, name, handoff


def chunks(numbers: Sequence[int], size: int = CHUNK) -> list[list[int]]:
    return [list(numbers[i:i + size]) for i in range(0, len(numbers), size)]


def still_writing_note(reader: CaptureReader) -> str | None:
    """A one-line note when the capture has no finish mark (still being written, or its run stopped)."""
    if reader.finished_at:
        return None
    count = len(reader.problem_numbers)
    return (f"note: {reader.path} is not finished (still being written, or its run stopped): using the "
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
