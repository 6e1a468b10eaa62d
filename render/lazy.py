"""Lazy public names for a package: `from render import X` imports X's module on first use."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """The module `__getattr__` and `__dir__` of `package` that resolve `exports` (name -> submodule)."""

    def lookup(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def listing():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return lookup, listing
