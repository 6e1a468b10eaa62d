"""The original LatentMAS's answer rule, next to this project's, so accuracies can be compared.

The original (Gen-Verse/LatentMAS, `utils.extract_gsm8k_answer` + `normalize_answer`, used by
every method for every non-code task) takes the contents of the last `\\boxed{...}` (no nested
braces: the contents end at the first `}`), then the first number in them
(`[-+]?\\d+(?:\\.\\d+)?`), else the stripped contents; with no box at all, the last number of
the whole text. The result is stripped and lower-cased and compared with the gold answer as a
string (so "18.0" is not "18", and "1,000" reads as "1"). Multiple-choice tasks use the same
function: `\\boxed{C}` gives "c", compared with the lower-cased gold letter. AIME compares
`int(prediction) == int(gold)`; a prediction that is not an integer is wrong.

This project's rule (`Task.extract_answer` / `Task.is_correct`) is more lenient: nested
braces, LaTeX wrappers, thousands separators, fractions, answer cues, numeric equality. For the
same outputs its accuracy is at least the original's, and usually higher.

No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_BOX_RE = re.compile(r"\\boxed\{([^}]*)\}")
_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_INTEGER_TASKS = ("aime2024", "aime2025")


def original_prediction(text: str | None) -> str | None:
    """The original's prediction from model output: see the module docstring. None if it finds nothing."""
    if not text:
        return None
    boxes = _BOX_RE.findall(text)
    if boxes:
        number = _NUMBER_RE.search(boxes[-1])
        found = number.group(0) if number else boxes[-1].strip()
    else:
        numbers = _NUMBER_RE.findall(text)
        if not numbers:
            return None
        found = numbers[-1]
    return found.strip().lower()


def original_gold(gold: str) -> str:
    """This project's normalised gold as the original writes it: lower-cased ("C" -> "c", "18" -> "18")."""
    return str(gold).strip().lower()


def original_correct(task_name: str, prediction: str | None, gold: str) -> bool:
    """Whether the original counts `prediction` (from `original_prediction`) as right for `task_name`."""
    expected = original_gold(gold)
    if task_name in _INTEGER_TASKS:
        try:
            return prediction is not None and int(prediction) == int(expected)
        except ValueError:  # the original: "Value error in parsing answer" -> wrong
            return False
    return bool(prediction) and bool(expected) and prediction == expected


def tally(rows: Iterable[Mapping]) -> tuple[int, int, int]:
    """(correct, correct_original, total) over results.jsonl rows (dicts).

    A row written before `correct_original` existed counts as not correct under the original's rule.
    """
    correct = correct_original = total = 0
    for row in rows:
        total += 1
        correct += bool(row.get("correct"))
        correct_original += bool(row.get("correct_original"))
    return correct, correct_original, total


def accuracy_fields(correct: int, correct_original: int, total: int) -> dict:
    """The summary's accuracy entries: this project's rule and the original's, over `total` problems."""
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "accuracy_original": correct_original / total if total else 0.0,
        "correct_original": correct_original,
    }
