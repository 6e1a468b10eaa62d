"""Which problems and hand-offs a command works on: the `--problems` and `--transitions` specs.

Torch-free and h5py-free; shared by capture (what to record) and render (what to draw). In
every result, None means "all".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The hand-offs a capture records unless told otherwise (render draws whatever a file holds).
DEFAULT_TRANSITIONS = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger")


def parse_transitions(spec: str | Iterable[str] | None, default: tuple[str, ...] | None = None,
                      known: Iterable[str] | None = None) -> tuple[str, ...] | None:
    """'planner_to_critic, critic_to_refiner' -> the names; 'all' -> None (every hand-off);
    None or '' -> `default`. With `known`, an unknown name is a ValueError (one line)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return default
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return None
    if not names:
        raise ValueError(f"--transitions {spec!r} names no hand-off; give names or 'all'")
    if known is not None:
        known = sorted(set(known))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown transition {unknown[0]!r}; choose from {', '.join(known)} or all")
    return tuple(names)


def parse_problem_spec(spec: str | Iterable[int] | None) -> set[int] | None:
    """'1-5,9' -> {1, 2, 3, 4, 5, 9}; None or '' -> None (all problems). Raises ValueError."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return {int(n) for n in spec}
    if not spec.strip():
        return None
    numbers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ValueError(f"bad problem spec {spec!r}: {part!r} is not a number or a range like 1-5")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"bad problem spec {spec!r}: range {part!r} runs backwards")
        if last - first > 1_000_000:
            raise ValueError(f"bad problem spec {spec!r}: range {part!r} is too large")
        numbers.update(range(first, last + 1))
    return numbers
