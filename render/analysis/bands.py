"""Horizontal bands, vertical bands and hotspots of one hand-off's [num_layers, T] matrix, by a fixed rule.

The rule (`BandRule`, defaults in brackets), on a matrix X with NaN cells ignored. "Spread" is the
robust standard deviation 1.4826 * median(|x - median(x)|) (the plain standard deviation when that
is 0; no band or hotspot at all when both are 0):

1. Horizontal band: every row's level r[l] = median over columns of X[l, :], and the typical
   within-row spread s = median over rows of each row's spread. Layer l stands out when
   |r[l] - median(r)| >= `horizontal` [2.0] * s: "high" above, "low" below. Adjacent layers with
   the same sign form one band. Score: the mean of (r[l] - median(r)) / s over its layers.
2. Vertical band: cells are scored against their own row, z[l, t] = (X[l, t] - r[l]) / spread of
   row l. Column t is high when z >= `vertical_z` [1.5] at `vertical_share` [0.75] or more of the
   layers where it has a value. Adjacent high columns form one band (one column is a band too).
   Score: the mean z over its cells.
3. Hotspot: what neither a layer's nor a column's level explains. With the row levels removed,
   R = X - r[:, None], and each column's median c[t] = median over layers of R[:, t], the residual
   E = R - c is standardised by its own spread over the whole matrix; cells with
   E >= `hotspot` [5.0] spreads, outside every band found above, are hot, and 8-connected hot
   cells form one hotspot, reported at its peak. Score: the peak's standardised residual.

For independent noise these thresholds essentially never fire (a column reaching 1.5 spreads at
27 of 36 layers, or a Gaussian cell at 5 spreads, are both under one in a million); real captures
have structure, and what this reports is how much of it stands out, not a significance test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .segments import column_segments

MAD_TO_STD = 1.4826
BAND_COLUMNS = ["handoff", "problem", "type", "sign", "layer_first", "layer_last", "column_first", "column_last",
                "position_first", "position_last", "agent", "kind", "tokens", "value", "score", "cells"]


@dataclass(frozen=True)
class BandRule:
    """Thresholds of the rule in the module docstring."""

    horizontal: float = 2.0
    vertical_z: float = 1.5
    vertical_share: float = 0.75
    hotspot: float = 5.0


@dataclass(frozen=True)
class Band:
    """One finding. type 'horizontal' | 'vertical' | 'hotspot'; layers and columns are inclusive ranges;
    value: mean of the matrix over the band's cells (a hotspot: its peak value); cells: how many cells."""

    type: str
    sign: str
    layer_first: int
    layer_last: int
    column_first: int
    column_last: int
    value: float
    score: float
    cells: int


def _median(x: np.ndarray, axis=None) -> np.ndarray:
    """np.median, NaN ignored (np.nanmedian, slower, only when there is a NaN; NaN where nothing is finite)."""
    if np.isnan(x).any():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(x, axis=axis)
    return np.median(x, axis=axis)


def robust_spread(x: np.ndarray, axis=None) -> np.ndarray:
    """1.4826 * median absolute deviation along `axis` (NaN ignored; NaN where nothing is finite)."""
    centre = _median(x, axis=axis)
    centre = np.expand_dims(centre, axis) if axis is not None else centre
    return MAD_TO_STD * _median(np.abs(x - centre), axis=axis)


def _column_medians(x: np.ndarray) -> np.ndarray:
    """Median over axis 0 of a [L, T] array with few rows: one sort of the columns (NaN-aware fallback)."""
    if np.isnan(x).any():
        return _median(x, axis=0)
    ordered = np.sort(x, axis=0)
    rows = x.shape[0]
    return 0.5 * (ordered[(rows - 1) // 2] + ordered[rows // 2])


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (first, last) of every run of True in a 1-D bool array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def _mean(cells: np.ndarray) -> float:
    finite = np.isfinite(cells)
    return float(cells[finite].mean()) if finite.any() else float("nan")


def find_bands(matrix: np.ndarray, rule: BandRule = BandRule()) -> list[Band]:
    """Bands and hotspots of a [num_layers, T] matrix (NaN allowed) by `rule` (see the module docstring)."""
    X = np.asarray(matrix, dtype=np.float32)
    num_layers, width = X.shape
    finite = np.isfinite(X)
    if num_layers == 0 or width == 0 or not finite.any():
        return []
    if not finite.all():
        X = np.where(finite, X, np.float32(np.nan))
    levels = _median(X, axis=1)  # [L]
    row_spread = MAD_TO_STD * _median(np.abs(X - levels[:, None]), axis=1)  # [L]
    known = np.isfinite(row_spread)
    spread = float(np.median(row_spread[known])) if known.any() else float("nan")
    if not spread > 0:
        spread = float(np.nanstd(X))
    if not spread > 0:
        return []
    found: list[Band] = []
    in_band = np.zeros(X.shape, dtype=bool)

    # 1. horizontal bands
    offset = (levels - np.median(levels[np.isfinite(levels)])) / spread
    for sign, flags in (("high", offset >= rule.horizontal), ("low", offset <= -rule.horizontal)):
        for first, last in _runs(flags):
            cells = X[first:last + 1]
            found.append(Band("horizontal", sign, first, last, 0, width - 1, _mean(cells),
                              float(np.mean(offset[first:last + 1])), int(np.isfinite(cells).sum())))
            in_band[first:last + 1] = True

    # 2. vertical bands
    row_scale = np.where(row_spread > 0, row_spread, spread).astype(np.float32)
    z = (X - levels[:, None]) / row_scale[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (z >= rule.vertical_z).sum(axis=0) / finite.sum(axis=0)
    for first, last in _runs(np.nan_to_num(share, nan=0.0) >= rule.vertical_share):
        cells = X[:, first:last + 1]
        found.append(Band("vertical", "high", 0, num_layers - 1, first, last, _mean(cells),
                          _mean(z[:, first:last + 1]), int(np.isfinite(cells).sum())))
        in_band[:, first:last + 1] = True

    # 3. hotspots
    rest = X - levels[:, None]
    residual = rest - _column_medians(rest)[None, :]
    residual_spread = float(robust_spread(residual))
    if not residual_spread > 0:
        residual_spread = spread
    standard = residual / np.float32(residual_spread)
    hot = (standard >= rule.hotspot) & ~in_band  # NaN compares False
    if hot.any():
        from scipy import ndimage

        labelled, _ = ndimage.label(hot, structure=np.ones((3, 3), dtype=bool))
        for index, where in enumerate(ndimage.find_objects(labelled), start=1):
            mask = labelled[where] == index
            scores = np.where(mask, standard[where], -np.inf)
            peak = np.unravel_index(int(np.argmax(scores)), mask.shape)
            layer, column = int(where[0].start + peak[0]), int(where[1].start + peak[1])
            found.append(Band("hotspot", "high", layer, layer, column, column, float(X[layer, column]),
                              float(standard[layer, column]), int(mask.sum())))
    return found


def _join_tokens(tokens, first: int, last: int, most: int = 8) -> str:
    from capture.text import one_line

    shown = [one_line(t) for t in tokens[first:min(last + 1, first + most)]]
    more = " …" if last + 1 - first > most else ""
    return "|".join(shown) + more


class BandCollector:
    """Accumulates `add(problem, label, matrix, handoff)`: the bands of every hand-off and how often each layer
    and segment is in one; `table()`, `layer_shares()`, `segment_shares()` are DataFrames."""

    def __init__(self, num_layers: int, rule: BandRule = BandRule()):
        self.num_layers = num_layers
        self.rule = rule
        self._rows: list[dict] = []
        self._kept: dict[tuple[int, str], list[Band]] = {}
        self._handoffs: dict[str, int] = {}
        self._layer_high: dict[str, np.ndarray] = {}
        self._layer_low: dict[str, np.ndarray] = {}
        self._hotspot_layers: dict[str, np.ndarray] = {}
        self._segment_columns: dict[tuple[str, str, str], list[int]] = {}

    def add(self, problem: int, label: str, matrix: np.ndarray, handoff, keep: bool = False) -> list[Band]:
        """Find the bands of one hand-off (matrix [num_layers, T], NaN allowed); keep them for `bands_of` if asked."""
        bands = find_bands(matrix, self.rule)
        if keep:
            self._kept[(problem, label)] = bands
        segments = column_segments(handoff)
        self._handoffs[label] = self._handoffs.get(label, 0) + 1
        high = self._layer_high.setdefault(label, np.zeros(self.num_layers, dtype=np.int64))
        low = self._layer_low.setdefault(label, np.zeros(self.num_layers, dtype=np.int64))
        hot_layers = self._hotspot_layers.setdefault(label, np.zeros(self.num_layers, dtype=np.int64))
        banded = np.zeros(handoff.num_columns, dtype=bool)
        for band in bands:
            if band.type == "horizontal":
                (high if band.sign == "high" else low)[band.layer_first:band.layer_last + 1] += 1
            elif band.type == "vertical":
                banded[band.column_first:band.column_last + 1] = True
            else:
                hot_layers[band.layer_first] += 1
            labels = ({segments.labels[p] for p in np.unique(segments.index[band.column_first:band.column_last + 1])}
                      if band.type != "horizontal" else set(segments.labels))
            agent = "+".join(sorted({a for a, _ in labels}))
            kind = "+".join(sorted({k for _, k in labels}))
            self._rows.append({
                "handoff": label, "problem": problem, "type": band.type, "sign": band.sign,
                "layer_first": band.layer_first, "layer_last": band.layer_last,
                "column_first": band.column_first, "column_last": band.column_last,
                "position_first": int(handoff.positions[band.column_first]),
                "position_last": int(handoff.positions[band.column_last]),
                "agent": agent, "kind": kind,
                "tokens": "" if band.type == "horizontal" else _join_tokens(handoff.tokens, band.column_first,
                                                                            band.column_last),
                "value": band.value, "score": band.score, "cells": band.cells})
        for place, (agent, kind) in enumerate(segments.labels):
            columns = segments.index == place
            counts = self._segment_columns.setdefault((label, agent, kind), [0, 0])
            counts[0] += int(columns.sum())
            counts[1] += int((columns & banded).sum())
        return bands

    def merge(self, other: BandCollector) -> None:
        """Fold in what `other` accumulated (over later problems)."""
        self._rows += other._rows
        self._kept.update(other._kept)
        for label, count in other._handoffs.items():
            self._handoffs[label] = self._handoffs.get(label, 0) + count
            for mine, theirs in ((self._layer_high, other._layer_high), (self._layer_low, other._layer_low),
                                 (self._hotspot_layers, other._hotspot_layers)):
                if label in mine:
                    mine[label] = mine[label] + theirs[label]
                else:
                    mine[label] = theirs[label]
        for key, (total, banded) in other._segment_columns.items():
            counts = self._segment_columns.setdefault(key, [0, 0])
            counts[0] += total
            counts[1] += banded

    def bands_of(self, problem: int, label: str) -> list[Band]:
        return self._kept.get((problem, label), [])

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows, columns=BAND_COLUMNS)

    def layer_shares(self) -> pd.DataFrame:
        """Per hand-off label and layer: share of hand-offs where the layer is in a high / low horizontal band,
        and hotspots per hand-off at that layer."""
        parts = []
        for label, total in self._handoffs.items():
            parts.append(pd.DataFrame({
                "handoff": label, "layer": np.arange(self.num_layers), "handoffs": total,
                "share_high": self._layer_high[label] / total, "share_low": self._layer_low[label] / total,
                "hotspots_per_handoff": self._hotspot_layers[label] / total}))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def segment_shares(self) -> pd.DataFrame:
        """Per hand-off label and segment: its columns, and the share of them inside a vertical band."""
        rows = [{"handoff": label, "agent": agent, "kind": kind, "columns": total, "in_vertical_band": banded,
                 "share": banded / total if total else np.nan}
                for (label, agent, kind), (total, banded) in self._segment_columns.items()]
        return pd.DataFrame(rows, columns=["handoff", "agent", "kind", "columns", "in_vertical_band", "share"])

    def frequent_layers(self, label: str, share: float = 0.5) -> dict[int, str]:
        """layer -> 'high' / 'low' for the layers in a horizontal band in at least `share` of the hand-offs."""
        total = self._handoffs.get(label, 0)
        if not total:
            return {}
        out = {}
        for layer in range(self.num_layers):
            if self._layer_high[label][layer] >= share * total:
                out[layer] = "high"
            elif self._layer_low[label][layer] >= share * total:
                out[layer] = "low"
        return out


def mark_bands(ax, bands: list[Band]) -> None:
    """Outline `bands` on a heatmap axes whose cells are centred on integer (column, layer) coordinates:
    horizontal bands dashed black, vertical bands magenta, hotspots as circles."""
    from matplotlib.patches import Rectangle

    for band in bands:
        x0, x1 = band.column_first - 0.5, band.column_last + 0.5
        y0, y1 = band.layer_first - 0.5, band.layer_last + 0.5
        if band.type == "hotspot":
            ax.plot([band.column_first], [band.layer_first], marker="o", markersize=9, markerfacecolor="none",
                    markeredgecolor="black", markeredgewidth=1.2)
            continue
        style = dict(fill=False, linewidth=1.3)
        style.update(edgecolor="black", linestyle="--") if band.type == "horizontal" else style.update(
            edgecolor="magenta", linestyle="-")
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, **style))


def bands_legend(bands: list[Band]) -> str:
    """A one-line count for a figure's notes,
    e.g. 'bands: 1 horizontal (dashed), 2 vertical (magenta), 0 hotspots (○)'."""
    count = {kind: sum(b.type == kind for b in bands) for kind in ("horizontal", "vertical", "hotspot")}
    return (f"bands: {count['horizontal']} horizontal (dashed), {count['vertical']} vertical (magenta), "
            f"{count['hotspot']} hotspots (○)")


def band_dicts(bands: list[Band]) -> list[dict]:
    return [asdict(b) for b in bands]
