"""The methods: `baseline`, `text_mas`, `latent_mas`. Each has `solve(lm, problems, task, cfg, observer)`."""

from importlib import import_module

METHODS = ("baseline", "text_mas", "latent_mas")


def method_names() -> tuple[str, ...]:
    return METHODS


def get_method(name: str):
    """The `solve` function of a method."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return import_module(f"{__name__}.{name}").solve
