"""Colour scales: which colormap and value range each similarity mode gets.

Cosine modes ("seed" and any other mode not named like attention) are signed:
RdYlGn on a fixed -1 ... +1 scale centred at 0 (green high, yellow ~0, red
negative). Attention modes are weights in [0, 1]: a sequential colormap on
their own 0 ... max scale. NaN cells are drawn in a neutral grey (magenta for
colormaps that are themselves grey), never left blank.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap

DEFAULT_CMAP = "RdYlGn"
DEFAULT_SINGLE_CMAP = "YlOrRd"
DEFAULT_ATTENTION_CMAP = "viridis"
DEFAULT_MODE = "seed"

NAN_COLOR = "#8c8c8c"
NAN_COLOR_ON_GREY = "#ff00ff"
_GREY_CMAPS = {"gray", "grey", "greys", "binary", "gist_gray", "gist_grey", "gist_yarg", "bone"}


class UnknownColormap(ValueError):
    """An unknown colormap name; the message is one line and suggests close names."""


def is_attention_mode(mode: str | None) -> bool:
    """True for similarity modes whose values are weights in [0, 1] rather than signed cosines."""
    return "attention" in (mode or "").lower() or "attn" in (mode or "").lower()


def check_cmap(name: str) -> str:
    """Return `name` if matplotlib knows it, else raise UnknownColormap listing close names."""
    if name in colormaps:
        return name
    names = list(colormaps)
    lowered = {n.lower(): n for n in names}
    if name.lower() in lowered:
        close = [lowered[name.lower()]]
    else:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        close += [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=4, cutoff=0.5)
                  if lowered[c] not in close]
    hint = f"; did you mean {', '.join(close[:4])}?" if close else "; see matplotlib's colormap list"
    raise UnknownColormap(f"unknown colormap {name!r}{hint}")


def colormap(name: str) -> Colormap:
    """A private copy of the named colormap with NaN ('bad') cells in a neutral colour.

    The copy never touches matplotlib's registered colormaps, so nothing leaks between figures.
    """
    check_cmap(name)
    base = name[:-2] if name.endswith("_r") else name
    bad = NAN_COLOR_ON_GREY if base.lower() in _GREY_CMAPS else NAN_COLOR
    return colormaps[name].with_extremes(bad=bad)


@dataclass(frozen=True)
class Scale:
    """How one multi-layer figure maps values to colours."""

    cmap: str
    vmin: float
    vmax: float
    label: str


def scale_for(mode: str | None, values: np.ndarray, cmap: str | None = None,
              vmin: float | None = None, vmax: float | None = None) -> Scale:
    """The colour scale of a multi-layer figure of `values` ([num_layers, T]) in similarity `mode`.

    Explicit `cmap`, `vmin`, `vmax` win; otherwise cosine modes get RdYlGn on -1 ... 1 and
    attention modes a sequential colormap on 0 ... max(values).
    """
    if is_attention_mode(mode):
        if vmax is None:
            finite = values[np.isfinite(values)] if values.size else values
            top = float(finite.max()) if finite.size else 1.0
            vmax = top if top > 0 else 1.0
        lo = 0.0 if vmin is None else float(vmin)
        hi = float(vmax)
        if hi <= lo:
            hi = lo + 1.0
        return Scale(cmap or DEFAULT_ATTENTION_CMAP, lo, hi, "attention weight")
    lo = -1.0 if vmin is None else float(vmin)
    hi = 1.0 if vmax is None else float(vmax)
    return Scale(cmap or DEFAULT_CMAP, lo, hi, "cosine similarity")
