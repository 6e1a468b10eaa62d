"""Comparable single-layer strips: one value range for a whole hand-off kind, or for the whole capture.

The render stage's strip (`render.figures.single_layer_strip`) min-max normalises each strip on its
own, so the same colour means different values in two strips. Here the range is collected while the
capture streams by, at the chosen layer:

- scale "strip": each strip on its own (as the render stage does);
- scale "handoff": the min and max over every hand-off with the same name (all problems);
- scale "capture": the min and max over every hand-off of the capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from render.figures import LITERAL

SCALES = ("strip", "handoff", "capture")


@dataclass
class Range:
    lo: float = np.inf
    hi: float = -np.inf

    def update(self, row: np.ndarray) -> None:
        finite = row[np.isfinite(row)]
        if len(finite):
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))

    @property
    def known(self) -> bool:
        return self.lo <= self.hi

    def as_list(self) -> list[float] | None:
        return [self.lo, self.hi] if self.known else None


class LayerRanges:
    """Value range at one layer per hand-off label and over the capture; `add(label, matrix)`."""

    def __init__(self, layer: int):
        self.layer = layer
        self.capture = Range()
        self.handoffs: dict[str, Range] = {}

    def add(self, label: str, matrix: np.ndarray) -> None:
        """matrix: [num_layers, T], NaN allowed."""
        row = matrix[self.layer]
        self.capture.update(row)
        self.handoffs.setdefault(label, Range()).update(row)

    def merge(self, other: LayerRanges) -> None:
        for mine, theirs in [(self.capture, other.capture)] + [
                (self.handoffs.setdefault(label, Range()), r) for label, r in other.handoffs.items()]:
            mine.lo, mine.hi = min(mine.lo, theirs.lo), max(mine.hi, theirs.hi)

    def range_for(self, scale: str, label: str, row: np.ndarray) -> tuple[float, float]:
        """(lo, hi) that `scale` normalises `row` (of hand-off `label`) with."""
        if scale not in SCALES:
            raise ValueError(f"unknown strip scale {scale!r}; use one of {', '.join(SCALES)}")
        if scale == "capture":
            chosen = self.capture
        elif scale == "handoff":
            chosen = self.handoffs.get(label, Range())
        else:
            chosen = Range()
            chosen.update(row)
        return (chosen.lo, chosen.hi) if chosen.known else (float("nan"), float("nan"))

    def as_dict(self) -> dict:
        return {"layer": self.layer, "capture": self.capture.as_list(),
                "handoff": {label: r.as_list() for label, r in self.handoffs.items()}}


def normalise(row: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[T] row -> (row - lo) / (hi - lo) in [0, 1] (NaN stays NaN; a zero-width range gives zeros)."""
    row = np.asarray(row, dtype=np.float64)
    span = hi - lo
    out = np.where(np.isfinite(row), (row - lo) / span if span > 0 else 0.0, np.nan)
    return np.clip(out, 0.0, 1.0)


def comparable_strip(handoff, layer: int, lo: float, hi: float, *, title: str = "", scale: str = "handoff",
                     cmap: str = "YlOrRd", dpi: float = 100):
    """One layer of `handoff` as a strip normalised to [lo, hi] (so strips with one range compare), with the
    segment band and the original cache positions on the x axis. Returns a Figure."""
    from matplotlib.colors import Normalize

    from render.colormaps import colormap
    from render.figures import agent_color, new_figure

    row = np.asarray(handoff.layer_similarities[layer], dtype=np.float64)
    width = len(row)
    fig = new_figure(min(20.0, max(6.4, 0.012 * width + 2.0)), 2.3, dpi)
    band_ax = fig.add_axes((0.06, 0.62, 0.86, 0.07))
    ax = fig.add_axes((0.06, 0.32, 0.86, 0.28), sharex=band_ax)
    cax = fig.add_axes((0.935, 0.32, 0.012, 0.37))
    image = ax.imshow(normalise(row, lo, hi)[None, :], aspect="auto", cmap=colormap(cmap),
                      norm=Normalize(0.0, 1.0), interpolation="nearest")
    for segment in handoff.segments:
        band_ax.axvspan(segment.start - 0.5, segment.stop - 0.5, color=agent_color(segment.agent, segment.kind))
        if segment.stop - segment.start >= max(1, width // 25):
            band_ax.text((segment.start + segment.stop - 1) / 2, 1.15, f"{segment.agent} {segment.kind}", **LITERAL,
                         ha="center", va="bottom", fontsize=6, transform=band_ax.get_xaxis_transform())
    band_ax.set_yticks([])
    band_ax.tick_params(axis="x", labelbottom=False)
    ax.set_yticks([0], [f"layer {layer}"], fontsize=7)
    ticks = ax.get_xticks()
    ticks = ticks[(ticks >= 0) & (ticks < width)].astype(int)
    ax.set_xticks(ticks, [str(int(handoff.positions[t])) for t in ticks], fontsize=7)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_xlabel("original cache position", fontsize=8)
    bar = fig.colorbar(image, cax=cax)
    bar.set_ticks([0, 1], labels=[f"{lo:.3g}", f"{hi:.3g}"])
    bar.ax.tick_params(labelsize=6)
    scope = {"strip": "this strip's own range", "handoff": "range over every hand-off of this name",
             "capture": "range over the whole capture"}[scale]
    fig.suptitle(f"{title} · layer {layer} · colours on [{lo:.3f}, {hi:.3f}] ({scope})", fontsize=8, y=0.97, **LITERAL)
    return fig
