"""Similarity modes: how an incoming agent's query relates to each cached token (placeholder registry)."""

MODES = ("seed", "query", "attention")


def mode_names() -> tuple[str, ...]:
    return MODES
