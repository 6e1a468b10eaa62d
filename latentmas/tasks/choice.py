"""Multiple-choice tasks: GPQA (diamond), MedQA and ARC (easy / challenge).

Every task shows its options relabelled by position as "A. ...", "B. ...", and
the gold answer is the letter of the correct option.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence

from .base import HubSpec, Task, get_field, get_text, last_boxed, register, unwrap_latex

Option = tuple[str | None, str]  # (original label or None, option text)

_LABELLED_TEXT_RE = re.compile(r"^\(?([A-Za-z0-9])[.):]\s+(.*)$", re.DOTALL)


def _squash(text: str) -> str:
    """Lower-case text with runs of whitespace collapsed, for loose comparison."""
    return " ".join(str(text).split()).lower()


def normalise_options(raw: Any) -> list[Option]:
    """Options from any of the shapes the datasets use.

    Accepted: {"label": [...], "text": [...]} (HF ARC); {"A": text, ...} (MedQA);
    a list of strings, optionally prefixed "A. " (LatentMAS MedQA); a list of
    {"label", "text"} or {"key", "value"} objects (original ARC, BigBio).
    """
    if isinstance(raw, Mapping) and {"label", "text"} <= set(raw):
        options = list(zip(raw["label"], raw["text"]))
    elif isinstance(raw, Mapping):
        options = list(raw.items())
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        options = []
        for item in raw:
            if isinstance(item, Mapping):
                options.append((get_field(item, "label", "key"), get_field(item, "text", "value")))
            elif isinstance(item, str) and (labelled := _LABELLED_TEXT_RE.match(item.strip())):
                options.append((labelled.group(1), labelled.group(2)))
            else:
                options.append((None, item))
    else:
        raise ValueError(f"options should be a list or a mapping, got {type(raw).__name__}")
    cleaned = [(None if label is None else str(label).strip(), str(text).strip()) for label, text in options]
    if len(cleaned) < 2 or any(not text for _, text in cleaned):
        raise ValueError("need at least two non-empty options")
    return cleaned


def strip_embedded_options(stem: str, options: Sequence[Option]) -> str:
    """Cut a question stem before an options list it already contains ("...\\nA. text")."""
    first = re.escape(options[0][1])
    match = re.search(r"(?:^|\n)[ \t]*\(?[A-Za-z0-9][.):][ \t]*" + first, stem)
    return stem[: match.start()].rstrip() if match else stem


def resolve_gold(answer: Any, options: Sequence[Option]) -> int:
    """Index of the correct option given its label ("C", "3"), its text, or its position letter."""
    wanted = _squash(answer)
    for field in (0, 1):  # the option's own label first, then its text
        hits = [i for i, option in enumerate(options) if option[field] is not None and _squash(option[field]) == wanted]
        if len(hits) == 1:
            return hits[0]
    if all(label is None for label, _ in options) and re.fullmatch(r"[a-z]", wanted):
        position = ord(wanted) - ord("a")
        if position < len(options):
            return position
    contains = [i for i, (_, text) in enumerate(options) if len(wanted) > 3 and wanted in _squash(text)]
    if len(contains) == 1:
        return contains[0]
    raise ValueError(f"answer {str(answer)[:60]!r} matches no single option")


class ChoiceTask(Task):
    """Shared formatting, extraction and scoring for multiple-choice tasks."""

    answer_instruction = "Give the final answer as the option letter in \\boxed{}."
    letters = "ABCDE"

    def __init__(self, name: str, hub: HubSpec | None = None) -> None:
        super().__init__(name, hub)
        letter = f"[{self.letters}]"
        either_case = f"[{self.letters}{self.letters.lower()}]"
        cue = r"(?i:\b(?:answer|(?:correct|best|right)\s+(?:option|choice))\b)"
        self._cue_re = re.compile(
            cue + r"[\s*_]*(?i:is|would\s+be|should\s+be|will\s+be)?[\s*_]*[:=]?[\s*_]*(?i:option|choice)?[\s*_]*"
            rf"(?:\(?({either_case})\)|\[({either_case})\]|({letter})(?![\w']))"
        )
        self._last_line_re = re.compile(rf"^[\s*_(\[]*({letter})(?:[.):\]][\s*_].*|[.):\]]?[\s*_]*)$")
        self._box_re = re.compile(rf"^(?i:option|choice|answer)?[\s:]*[(\[]?\s*({either_case})(?![A-Za-z])")

    # ------------------------------------------------------------------ question

    def format_question(self, stem: str, options: Sequence[str]) -> str:
        """Stem followed by one "A. text" line per option."""
        if len(options) > len(self.letters):
            raise ValueError(f"{len(options)} options is more than {self.name} supports ({len(self.letters)})")
        lines = [f"{letter}. {text}" for letter, text in zip(self.letters, options)]
        return stem.strip() + "\n" + "\n".join(lines)

    def letter(self, index: int) -> str:
        """Letter shown for the option at `index`."""
        return self.letters[index]

    # ------------------------------------------------------------------ scoring

    def _letter_in(self, text: str) -> str | None:
        """Letter when `text` is just an option reference: "C", "(c)", "C. words", "Option C"."""
        match = self._box_re.match(unwrap_latex(text).strip().strip("*"))
        return match.group(1).upper() if match else None

    def extract_answer(self, text: str) -> str | None:
        """Last \\boxed{} letter; else "answer is (C)" / "Answer: C"; else a letter alone on the last line."""
        if not text:
            return None
        boxed = last_boxed(text)
        if boxed is not None and (letter := self._letter_in(boxed)) is not None:
            return letter
        cues = self._cue_re.findall(text)
        if cues:
            return next(group for group in cues[-1] if group).upper()
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if not lines:
            return None
        if len(text.strip()) <= 4:  # the whole output is a bare letter, any case
            return self._letter_in(text)
        match = self._last_line_re.match(lines[-1].strip())
        return match.group(1) if match else None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Case-insensitive letter comparison ("c", "(C)" and "C" all match gold "C")."""
        if prediction is None:
            return False
        letter = self._letter_in(prediction) or prediction.strip().upper()
        return letter == gold.strip().upper()


class GpqaTask(ChoiceTask):
    """GPQA: `Question`, `Correct Answer`, `Incorrect Answer 1..3`.

    The four options are shuffled with a generator seeded by the loader seed
    and the record index, so the correct letter varies but is reproducible.

    A record with `question` and a letter `answer` but no `Correct Answer` (the copy the original
    LatentMAS reads, fingertap/GPQA-Diamond: options already in the question, in a fixed order)
    is taken as it is, so `--data_file` on that copy gives the original's problems.
    """

    letters = "ABCD"

    def parse_record(self, record: Mapping[str, Any], *, index: int = 0, seed: int = 0) -> tuple[str, str]:
        try:
            get_field(record, "Correct Answer")
        except KeyError:
            return self._parse_lettered(record)
        stem = get_text(record, "Question")
        texts = [get_text(record, "Correct Answer")]
        texts += [get_text(record, f"Incorrect Answer {i}") for i in (1, 2, 3)]
        order = list(range(len(texts)))
        random.Random(f"gpqa:{seed}:{index}").shuffle(order)
        return self.format_question(stem, [texts[i] for i in order]), self.letter(order.index(0))

    def _parse_lettered(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """`question` with its options inside, `answer` a letter ("C", "(C)", "c")."""
        question = get_text(record, "question")
        answer = get_text(record, "answer")
        letter = self._letter_in(answer)
        if letter is None or letter not in self.letters or len(answer.strip("() .").strip()) != 1:
            raise ValueError(f"GPQA answer should be an option letter A-D, got {answer[:60]!r}")
        return question, letter


class MedqaTask(ChoiceTask):
    """MedQA: `question`, `options` (list or {"A": ...}), `answer_idx` letter or `answer` text.

    The LatentMAS copy repeats the options inside `question`; they are cut off
    and shown once.
    """

    def parse_record(self, record: Mapping[str, Any], *, index: int = 0, seed: int = 0) -> tuple[str, str]:
        options = normalise_options(get_field(record, "options"))
        stem = strip_embedded_options(get_text(record, "question"), options)
        try:
            answer = get_field(record, "answer_idx")
        except KeyError:
            answer = get_field(record, "answer")
        gold = self.letter(resolve_gold(answer, options))
        return self.format_question(stem, [text for _, text in options]), gold


class ArcTask(ChoiceTask):
    """ARC: `question` (text, or {"stem", "choices"}), `choices`, `answerKey` ("C" or "3")."""

    def parse_record(self, record: Mapping[str, Any], *, index: int = 0, seed: int = 0) -> tuple[str, str]:
        question = get_field(record, "question")
        if isinstance(question, Mapping):
            stem, raw_choices = get_text(question, "stem"), get_field(question, "choices")
        else:
            stem, raw_choices = get_text(record, "question"), get_field(record, "choices")
        options = normalise_options(raw_choices)
        gold = self.letter(resolve_gold(get_text(record, "answerKey"), options))
        return self.format_question(stem, [text for _, text in options]), gold


register(GpqaTask("gpqa", HubSpec("Idavidrein/gpqa", "gpqa_diamond", "train")))
register(MedqaTask("medqa", HubSpec("GBaker/MedQA-USMLE-4-options", None, "test")))
register(ArcTask("arc_easy", HubSpec("allenai/ai2_arc", "ARC-Easy", "test")))
register(ArcTask("arc_challenge", HubSpec("allenai/ai2_arc", "ARC-Challenge", "test")))
