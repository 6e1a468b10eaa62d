"""Text for messages: values and errors shortened to one line (no torch, no h5py)."""

from __future__ import annotations


def shorten(value, width: int = 40) -> str:
    """`value` as text on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__
