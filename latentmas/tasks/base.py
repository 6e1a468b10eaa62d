"""Shared pieces of the task layer: the Problem record, the Task base class,
the task registry and small text helpers used by every task family.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping


class TaskDataError(ValueError):
    """Any bad input to the task layer; the message is made a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Problem:
    """One benchmark problem, ready to be shown to agents and scored."""

    number: int  # 1-based position in the loaded list (after the max_samples cut)
    question: str  # full text shown to agents (options included for multiple choice)
    gold: str  # normalised gold answer, e.g. "18", "C", "204"
    source: str  # "path:LINE", "hub:<dataset id>" or "bundled:data/<task>.jsonl"


@dataclass(frozen=True)
class HubSpec:
    """Where a task lives on the Hugging Face hub."""

    dataset_id: str
    config: str | None
    split: str


class Task(ABC):
    """Base class of a benchmark task family; one instance per task name.

    Subclasses implement `parse_record` (dataset fields -> question, gold),
    `extract_answer` (model output -> prediction) and `is_correct`.
    """

    answer_instruction: str = "Give the final answer in \\boxed{}."

    def __init__(self, name: str, hub: HubSpec | None = None) -> None:
        self.name = name
        self.hub = hub

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @abstractmethod
    def parse_record(self, record: Mapping[str, Any], *, index: int = 0, seed: int = 0) -> tuple[str, str]:
        """Return (question text, normalised gold) from a raw dataset record.

        `index` is the record's 0-based position in its dataset and `seed` the
        loader's seed; only tasks that shuffle options use them. Raises
        KeyError(field) for a missing field and ValueError for a bad value.
        """

    @abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """Return the normalised prediction found in model output, or None."""

    @abstractmethod
    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Whether a prediction (raw or normalised) matches the gold answer."""


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task instance to the registry (called by the family modules)."""
    _REGISTRY[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    """Every registered task, in registration order."""
    return tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """Return the registered task called `name`, or raise TaskDataError."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise TaskDataError(f"unknown task {name!r}; choose from {', '.join(task_names())}")
    return _REGISTRY[key]


# --------------------------------------------------------------------------- helpers


def _key(name: str) -> str:
    """Field-name key that ignores case, spaces, underscores and dashes."""
    return re.sub(r"[\s_\-]", "", name).lower()


def get_field(record: Mapping[str, Any], *names: str) -> Any:
    """Return the first present, non-null field among `names`.

    Matching tolerates case and separator differences ("Correct Answer",
    "correct_answer"). Raises KeyError(names[0]) when none is present.
    """
    by_key = {_key(k): v for k, v in record.items() if isinstance(k, str)}
    for name in names:
        value = by_key.get(_key(name))
        if value is not None:
            return value
    raise KeyError(names[0])


def get_text(record: Mapping[str, Any], *names: str) -> str:
    """Like `get_field` but the value must be a non-empty string (numbers are converted)."""
    value = get_field(record, *names)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {names[0]!r} should be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {names[0]!r} is empty")
    return value.strip()


def boxed_contents(text: str) -> list[str]:
    r"""All `\boxed{...}` / `\fbox{...}` contents in order, nested braces handled.

    An unclosed final box is ignored.
    """
    found: list[str] = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:pos])
                    break
    return found


def last_boxed(text: str) -> str | None:
    r"""Contents of the last complete `\boxed{...}`, or None."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def unwrap_latex(text: str) -> str:
    r"""Drop simple LaTeX wrappers: `\text{X}` -> `X`, `\mathbf{X}` -> `X`, `$`, `\$`, `\(`."""
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[()\[\]]", " ", text)
    return text.replace("\\$", " ").replace("$", " ").strip()
