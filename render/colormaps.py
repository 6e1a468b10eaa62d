"""Colour scales: which colormap and value range a capture's similarity mode gets.

A capture file says what its values are (`ModeScale.of(attrs)`: the mode's label, value
range, colour scale and colormap, written by the mode itself), so render never guesses
from a mode's name. A "fixed" scale draws on the value range (the cosine modes: RdYlGn on
-1 ... +1, green high); a "data" scale from the range's low end to the data's max
(attention weights: viridis on 0 ... max). Files written before modes described
themselves get the built-in modes' descriptions (`LEGACY_MODES`). NaN cells are drawn in
a neutral grey (magenta for colormaps that are themselves grey), never left blank.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class ModeScale:
    """What a capture's values are: its similarity mode's name, label, range and colour scale."""

    name: str = DEFAULT_MODE
    label: str = "cosine similarity"
    low: float = -1.0
    high: float = 1.0
    colour_scale: str = "fixed"  # "fixed": low ... high; "data": low ... the data's max
    cmap: str = DEFAULT_CMAP

    def __str__(self) -> str:
        return self.name

    @classmethod
    def of(cls, attrs: dict) -> ModeScale:
        """The scale a capture's attributes describe (`similarity`, `similarity_label`, ...)."""
        name = str(attrs.get("similarity") or DEFAULT_MODE)
        if "similarity_min" not in attrs:
            return LEGACY_MODES.get(name, replace(cls(), name=name))
        scale = attrs.get("similarity_colour_scale")
        return cls(name=name, label=str(attrs.get("similarity_label") or "similarity"),
                   low=float(attrs["similarity_min"]), high=float(attrs.get("similarity_max", 1.0)),
                   colour_scale=scale if scale in ("fixed", "data") else "fixed",
                   cmap=str(attrs.get("similarity_cmap") or DEFAULT_CMAP))


# How files written before modes described themselves (schema 1, early) are drawn.
LEGACY_MODES = {
    "seed": ModeScale("seed"),
    "query": ModeScale("query"),
    "attention": ModeScale("attention", "attention weight", 0.0, 1.0, "data", DEFAULT_ATTENTION_CMAP),
}


def as_mode_scale(mode: ModeScale | str | None) -> ModeScale:
    """A `ModeScale`, from itself or a built-in mode's name (a figure function called from Python)."""
    if isinstance(mode, ModeScale):
        return mode
    name = mode or DEFAULT_MODE
    return LEGACY_MODES.get(name, replace(ModeScale(), name=name))


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


def scale_for(mode: ModeScale | str | None, values: np.ndarray, cmap: str | None = None,
              vmin: float | None = None, vmax: float | None = None) -> Scale:
    """The colour scale of a multi-layer figure of `values` ([num_layers, T]) in similarity `mode`.

    Explicit `cmap`, `vmin`, `vmax` win; otherwise the mode's own: its range ("fixed"), or its
    low end to max(values) ("data").
    """
    mode = as_mode_scale(mode)
    lo = mode.low if vmin is None else float(vmin)
    if vmax is not None:
        hi = float(vmax)
    elif mode.colour_scale == "data":
        finite = values[np.isfinite(values)] if values.size else values
        top = float(finite.max()) if finite.size else mode.high
        hi = top if top > lo else mode.high
    else:
        hi = mode.high
    if hi <= lo:
        hi = lo + 1.0
    return Scale(cmap or mode.cmap, lo, hi, mode.label)
