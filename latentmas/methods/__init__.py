"""The methods, one module each: `baseline`, `text_mas`, `latent_mas`.

A method is a module here with `solve(lm, problems, task, cfg, observer=None) -> [ProblemResult]`;
`SHARES_CACHE = True` marks a method whose agents share a KV cache (the ones capture can watch).
Adding a method is adding its module: the registry is the package's modules.
"""

from __future__ import annotations

import pkgutil
from functools import cache
from importlib import import_module
from types import ModuleType

_NOT_METHODS = {"common"}


@cache
def _modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_METHODS or info.name.startswith("_"):
            continue
        module = import_module(f"{__name__}.{info.name}")
        if callable(getattr(module, "solve", None)):
            found[info.name] = module
    return dict(sorted(found.items()))


def method_names(shares_cache: bool | None = None) -> tuple[str, ...]:
    """Every method (or only those whose agents do / do not share a KV cache)."""
    return tuple(name for name, module in _modules().items()
                 if shares_cache is None or bool(getattr(module, "SHARES_CACHE", False)) == shares_cache)


def get_method(name: str):
    """The `solve` function of a method."""
    if name not in _modules():
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return _modules()[name].solve
