"""Tasks whose answer is a number: GSM8K word problems and AIME (integers 0-999).

Numbers are compared by value, so "1,000", "1000", "$1000.00" and "1000.0"
are all the same answer.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from typing import Any, Mapping

from .base import HubSpec, Task, get_field, get_text, last_boxed, register, unwrap_latex

# An integer with optional thousands separators, or a decimal; a leading minus
# only when it cannot be a subtraction ("3-5" yields 3 and 5, "= -5" yields -5).
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRACTION_RE = re.compile(r"^(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_CUE_RES = (
    re.compile(r"####\s*\$?\s*(" + _NUMBER + ")"),
    re.compile(r"(?i:\banswer\b)[^0-9\n-]{0,20}?(" + _NUMBER + ")"),
)


def _clean(text: str) -> str:
    """Remove currency signs, LaTeX wrappers and typographic noise around numbers."""
    text = unwrap_latex(text).replace("{,}", ",")
    text = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", text)
    text = re.sub(r"\\[,!;: ]|\\%|%|\^\s*\{?\\circ\}?|°", "", text)
    return text.replace("\u2212", "-").strip()


def parse_number(text: str | int | float) -> Fraction | None:
    """Exact value of a number written as "1,000", "$18.00", "-2.5", "3/4" or "\\frac{3}{4}"."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return Fraction(str(text))
    cleaned = _clean(text).replace(",", "").replace(" ", "")
    fraction = _FRACTION_RE.match(cleaned)
    try:
        if fraction:
            return Fraction(fraction.group(1)) / Fraction(fraction.group(2))
        return Fraction(cleaned) if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", cleaned) else None
    except ZeroDivisionError:
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a value: "18", "0.5", "-3", or "1/3" when not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def normalise_number(text: str | int | float) -> str | None:
    """Canonical text of the number `text` is, or None if it is not one number."""
    value = parse_number(text)
    return None if value is None else format_number(value)


def find_number(text: str) -> str | None:
    """The whole of `text` as a number, else the last number inside it (normalised)."""
    whole = normalise_number(text)
    if whole is not None:
        return whole
    numbers = _NUMBER_RE.findall(_clean(text))
    return normalise_number(numbers[-1]) if numbers else None


class NumericTask(Task):
    """Shared extraction and scoring for tasks with a numeric answer."""

    answer_instruction = "Give the final answer as a number in \\boxed{}."

    def extract_answer(self, text: str) -> str | None:
        """Last \\boxed{} number; else a "#### N" or "answer is N" cue; else the last number."""
        if not text:
            return None
        boxed = last_boxed(text)
        if boxed is not None and (number := find_number(boxed)) is not None:
            return number
        for cue in _CUE_RES:
            matches = cue.findall(text)
            if matches:
                return normalise_number(matches[-1])
        numbers = _NUMBER_RE.findall(_clean(text))
        return normalise_number(numbers[-1]) if numbers else None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Numeric equality; falls back to exact text when either side is not a number."""
        if prediction is None:
            return False
        predicted, expected = parse_number(prediction), parse_number(gold)
        if predicted is not None and expected is not None:
            return predicted == expected
        return str(prediction).strip() == str(gold).strip()


class Gsm8kTask(NumericTask):
    """GSM8K: `question`, `answer` = worked solution whose last line is "#### N"."""

    def parse_record(self, record: Mapping[str, Any], *, index: int = 0, seed: int = 0) -> tuple[str, str]:
        question = get_text(record, "question")
        answer = get_text(record, "answer")
        final = answer.rsplit("####", 1)[-1] if "####" in answer else answer
        gold = normalise_number(final.strip())
        if gold is None:
            raise ValueError("field 'answer' should end with '#### <number>'")
        return question, gold


class AimeTask(NumericTask):
    """AIME: `problem` (or `Problem`/`question`), `answer` (or `Answer`), an integer 0-999."""

    answer_instruction = "Give the final answer as an integer from 0 to 999 in \\boxed{}."

    def parse_record(self, record: Mapping[str, Any], *, index: int = 0, seed: int = 0) -> tuple[str, str]:
        question = get_text(record, "problem", "question")
        raw = get_field(record, "answer")
        value = parse_number(raw if isinstance(raw, (int, float)) else str(raw))
        if value is None or value.denominator != 1 or not 0 <= value <= 999:
            raise ValueError(f"AIME answer should be an integer 0-999, got {raw!r}")
        return question, format_number(value)


register(Gsm8kTask("gsm8k", HubSpec("openai/gsm8k", "main", "test")))
register(AimeTask("aime2024", HubSpec("HuggingFaceH4/aime_2024", None, "train")))
register(AimeTask("aime2025", HubSpec("yentinglin/aime_2025", None, "train")))
