"""Figure kinds: how one hand-off is drawn. Built in: `multi` (multi.py), `single` (single.py).

A new kind is one file with one `FigureKind` subclass (see base.py), imported here or by the
code that uses it; `latentmas render --kind NAME` then draws it.
"""

from . import multi, single  # noqa: F401  (the built-in kinds register on import)
from .base import FigureKind, get_kind, kind_names, unregister

__all__ = ["FigureKind", "get_kind", "kind_names", "unregister"]
