"""Figures: each a small function of arrays returning a matplotlib Figure.

No pyplot: every figure is a `matplotlib.figure.Figure` bound to its own Agg canvas,
so nothing is shared between figures and nothing needs closing beyond dropping it.

    >>> fig = multi_layer_heatmap(layer_similarities, title="Planner → Critic · problem 1")
    >>> fig.savefig("heatmap.png")
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from . import layout as L
from .colormaps import DEFAULT_SINGLE_CMAP, colormap, scale_for

DEFAULT_DPI = 100

AGENT_COLORS = {
    "planner": "#1f77b4",
    "critic": "#ff7f0e",
    "refiner": "#9467bd",
    "judger": "#17becf",
}
_FALLBACK_COLORS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#2ca02c", "#d62728")
_UNCOVERED = (0.93, 0.93, 0.93)


@dataclass
class RenderInfo:
    """What a figure function drew, attached to the Figure as `fig.render_info` (for callers and tests).

    values: [rows, T] the values as coloured (for a strip: the normalised row, shape [1, T]).
    layout: the geometry (`layout.Layout`), e.g. `layout.heat_pixels(dpi)` finds the map in a PNG.
    """

    values: np.ndarray
    cmap: str
    vmin: float
    vmax: float
    layout: L.Layout


# -- small helpers -----------------------------------------------------------------------

def new_figure(width_in: float, height_in: float, dpi: float = DEFAULT_DPI) -> Figure:
    """A Figure with its own Agg canvas (never registered with pyplot)."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def agent_color(agent: str, kind: str = "latent") -> tuple[float, float, float]:
    """The segment-band colour of `agent`: full strength for latent steps, a light tint for prompts."""
    base = AGENT_COLORS.get(agent)
    if base is None:
        base = _FALLBACK_COLORS[sum(map(ord, agent)) % len(_FALLBACK_COLORS)]
    rgb = np.asarray(to_rgb(base))
    if kind != "latent":
        rgb = 0.45 * rgb + 0.55
    return tuple(float(c) for c in rgb)


def pretty_handoff(from_agent: str, to_agent: str) -> str:
    """'planner', 'critic' -> 'Planner → Critic'."""
    def pretty(name: str) -> str:
        return name.replace("_", " ").strip().title() or "?"
    return f"{pretty(from_agent)} → {pretty(to_agent)}"


def normalise_row(row: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max normalise a [T] row to [0, 1]; returns (normalised, raw min, raw max).

    Non-finite cells stay NaN and are ignored for the range. A constant row gives zeros,
    never NaN. A row with no finite value gives (all-NaN row, nan, nan).
    """
    row = np.asarray(row, dtype=np.float64)
    finite = np.isfinite(row)
    out = np.full(row.shape, np.nan)
    if not finite.any():
        return out, float("nan"), float("nan")
    lo, hi = float(row[finite].min()), float(row[finite].max())
    span = hi - lo
    out[finite] = (row[finite] - lo) / span if span > 0 else 0.0
    return out, lo, hi


def count_bad(values: np.ndarray) -> int:
    """Number of NaN / infinite cells."""
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def _bad_note(bad: int, total: int) -> str:
    if not bad:
        return ""
    noun = "cell" if bad == 1 else "cells"
    return f"{bad} NaN {noun} (grey)" if bad < total else f"all {bad} cells NaN (grey)"


def _gap_note(gaps: L.Gaps) -> str:
    if not len(gaps):
        return ""
    runs = "run" if len(gaps) == 1 else "runs"
    return f"kNN removed {gaps.removed} positions in {len(gaps)} {runs} (▲ under the map)"


# -- shared pieces --------------------------------------------------------------------------

def _draw_band(ax, lay: L.Layout, segments: Sequence, placed: Sequence, num_columns: int) -> None:
    """The coloured segment band above the heatmap frame, with labels above it.

    Drawn by the heatmap axes outside its frame (x in data units, y in axes fractions).
    """
    y0, y1 = lay.band
    over = blended_transform_factory(ax.transData, ax.transAxes)
    bars = [(s.start - 0.5, s.stop - s.start) for s in segments if s.stop > s.start]
    colours = [agent_color(s.agent, s.kind) for s in segments if s.stop > s.start]
    ax.broken_barh([(-0.5, num_columns)], (y0, y1 - y0), transform=over, clip_on=False,
                   facecolors=[_UNCOVERED], edgecolors="0.3", linewidth=0.5)
    ax.broken_barh(bars, (y0, y1 - y0), transform=over, clip_on=False, facecolors=colours,
                   edgecolors="white", linewidth=0.8)
    for label in placed:
        ax.text(label.x, y1 + 0.25 * lay.label_row + label.row * lay.label_row, label.text, transform=over,
                ha="center", va="bottom", fontsize=L.SEGMENT_LABEL_PT, clip_on=False)
    ax.text(-0.006, (y0 + y1) / 2, "segments", transform=ax.transAxes, ha="right", va="center", fontsize=7,
            color="0.3", clip_on=False)


def _draw_rug(ax, lay: L.Layout, gaps: L.Gaps) -> None:
    """Marks just under the heatmap frame where kNN filtering removed cache positions."""
    under = blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot(gaps.columns - 0.5, np.full(len(gaps), lay.rug), transform=under, clip_on=False, linestyle="none",
            marker="^", markersize=5, color="black")
    ax.text(-0.006, lay.rug, "kNN gaps", transform=ax.transAxes, ha="right", va="center", fontsize=7,
            color="0.3", clip_on=False)


def _x_axis(ax, lay: L.Layout, num_columns: int, tokens: Sequence[str] | None, token_labels: bool) -> None:
    """Ticks and label of the x axis: column numbers, or the token strings when they fit."""
    ax.tick_params(axis="x", pad=lay.tick_pad_pt)
    if token_labels and tokens is not None:
        ax.set_xticks(np.arange(num_columns))
        ax.set_xticklabels([L.format_token(t) for t in tokens], rotation=90, fontsize=L.TOKEN_LABEL_PT)
        ax.set_xlabel("KV cache token (column; tick labels are the cached tokens)", fontsize=9)
    else:
        ax.set_xticks(L.column_ticks(num_columns, lay.plot_width_in))
        ax.tick_params(axis="x", labelsize=L.TICK_PT)
        ax.set_xlabel(f"KV cache token (column 0 … {num_columns - 1})", fontsize=9)


def _heatmap_axes(fig: Figure, lay: L.Layout, data: np.ndarray, cmap_name: str, vmin: float, vmax: float,
                  segments: Sequence, placed: Sequence, gaps: L.Gaps, tokens):
    """Heatmap, segment band, boundaries, gap marks and x axis; returns (heat axes, mappable for the colour bar)."""
    rows, num_columns = data.shape
    ax = fig.add_axes(lay.heat)
    # Colour the cells once here (NaN -> the colormap's 'bad' grey) and hand matplotlib an RGBA
    # image: resampling bytes is about 3x faster than normalising floats at every draw.
    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=colormap(cmap_name))
    rgba = mappable.to_rgba(data, bytes=True)
    extra = {"interpolation_stage": "rgba"} if lay.interpolation == "antialiased" else {}
    ax.imshow(rgba, aspect="auto", origin="lower", interpolation=lay.interpolation, **extra)
    ax.set_xlim(-0.5, num_columns - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    cuts = L.segment_boundaries(segments, num_columns)
    if cuts:
        ax.vlines(np.asarray(cuts) - 0.5, -0.5, rows - 0.5, colors="black", linewidth=0.7, alpha=0.6)
    if lay.band is not None:
        _draw_band(ax, lay, segments, placed, num_columns)
    if lay.rug is not None:
        _draw_rug(ax, lay, gaps)
    _x_axis(ax, lay, num_columns, tokens, lay.token_labels)
    fig.render_info = RenderInfo(values=data, cmap=cmap_name, vmin=vmin, vmax=vmax, layout=lay)
    return ax, mappable


def _title(fig: Figure, lay: L.Layout, lines: list[str]) -> None:
    fig.suptitle("\n".join(lines), y=lay.title_y, va="top", fontsize=L.TITLE_PT, linespacing=1.3)


def _title_lines(parts: Sequence[str], width_in: float) -> list[str]:
    return L.wrap_title(parts, max(width_in - 0.4, 3.0))


def _token_labels(tokens, num_columns: int, wanted: bool) -> tuple[bool, int]:
    """(draw token labels?, longest label in characters): only with one token per column that fits."""
    if not wanted or tokens is None or len(tokens) != num_columns or num_columns > L.max_labelled_tokens():
        return False, 0
    return True, max((len(L.format_token(t)) for t in tokens), default=1)


def _empty(title: str, mode: str, rows: int, num_columns: int, dpi: float) -> Figure | None:
    """The figure that says there is nothing to draw, or None when there is something."""
    if num_columns and rows:
        return None
    what = "empty cache (T = 0)" if num_columns == 0 else "no layers in this capture"
    return empty_figure(f"{title} · similarity: {mode}" if title else f"similarity: {mode}", what, dpi)


def _framed(data: np.ndarray, cmap_name: str, vmin: float, vmax: float, *, title_parts: Sequence[str],
            notes: Sequence[str], segments: Sequence, positions, tokens, token_labels: bool, dpi: float,
            strip: bool = False):
    """What both figures share: layout, title, heatmap, segment band, gap marks and x axis.

    data: `[rows, T]` values to draw; title_parts: the title's lines before the gap note and `notes`.
    Returns (figure, heat axes, mappable for the colour bar, layout).
    """
    rows, num_columns = data.shape
    token_labels, label_chars = _token_labels(tokens, num_columns, token_labels)
    gaps = L.find_gaps(positions)
    segments = list(segments or ())
    placed = L.place_segment_labels(segments, num_columns, L.plot_width_in(num_columns, token_labels))
    width = L.figure_width_in(num_columns, token_labels, strip=strip)
    lines = _title_lines([*title_parts, _gap_note(gaps), *notes], width)
    lay = L.heatmap_layout(rows, num_columns, dpi, title_lines=len(lines), has_segments=bool(segments),
                           has_gaps=bool(len(gaps)), token_labels=token_labels, strip=strip,
                           token_label_chars=label_chars, label_rows=max((p.row for p in placed), default=-1) + 1)
    fig = new_figure(lay.width_in, lay.height_in, dpi)
    ax, image = _heatmap_axes(fig, lay, data, cmap_name, vmin, vmax, segments, placed, gaps, tokens)
    _title(fig, lay, lines)
    return fig, ax, image, lay


def _as_matrix(layer_similarities) -> np.ndarray:
    data = np.asarray(layer_similarities, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"layer_similarities must be [num_layers, T], got shape {data.shape}")
    return data


# -- figures ----------------------------------------------------------------------------------

def empty_figure(title: str, message: str, dpi: float = DEFAULT_DPI) -> Figure:
    """A small figure that says why there is nothing to draw (e.g. 'empty cache (T = 0)')."""
    fig = new_figure(6.4, 1.8, dpi)
    lines = _title_lines([title], 6.4)
    fig.suptitle("\n".join(lines), y=0.93, va="top", fontsize=L.TITLE_PT)
    fig.text(0.5, 0.35, message, ha="center", va="center", fontsize=12, color="0.35")
    fig.render_info = None
    return fig


def multi_layer_heatmap(
    layer_similarities: np.ndarray,
    *,
    title: str = "",
    segments: Sequence = (),
    positions: np.ndarray | None = None,
    tokens: Sequence[str] | None = None,
    mode: str = "seed",
    cmap: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    dpi: float = DEFAULT_DPI,
    token_labels: bool = False,
    notes: Sequence[str] = (),
) -> Figure:
    """Every layer's similarity to every cached token, layer 0 at the bottom.

    layer_similarities: [num_layers, T] floats (NaN allowed, drawn grey and counted in the title).
    segments: objects with .agent, .kind, .start, .stop (columns [start, stop) of one agent's
              prompt or latent steps), drawn as a coloured band with labels and boundary lines.
    positions: [T] original cache positions; gaps (kNN-removed positions) are marked under the map.
    tokens: T token strings, written as tick labels when `token_labels` and they fit.
    mode: similarity mode; cosine modes use RdYlGn on -1 ... 1, attention modes a
          sequential colormap on 0 ... max (see colormaps.scale_for); cmap/vmin/vmax override.
    title: heading such as 'Planner → Critic · problem 3'; shape, mode and notes are appended.
    """
    data = _as_matrix(layer_similarities)
    num_layers, num_columns = data.shape
    empty = _empty(title, mode, num_layers, num_columns, dpi)
    if empty is not None:
        return empty
    scale = scale_for(mode, data, cmap, vmin, vmax)
    fig, ax, image, lay = _framed(
        data, scale.cmap, scale.vmin, scale.vmax, title_parts=[
            title, f"{num_layers} layers × {num_columns} tokens", f"similarity: {mode}",
            _bad_note(count_bad(data), data.size)],
        notes=notes, segments=segments, positions=positions, tokens=tokens, token_labels=token_labels, dpi=dpi)
    plot_h_in = lay.heat[3] * lay.height_in
    ax.set_yticks(L.layer_ticks(num_layers, plot_h_in))
    ax.tick_params(axis="y", labelsize=L.TICK_PT)
    ax.set_ylabel("layer (0 = first, at the bottom)", fontsize=9)
    cax = fig.add_axes(lay.cbar)
    bar = fig.colorbar(image, cax=cax)
    if all(abs(v * 4 - round(v * 4)) < 1e-9 for v in (scale.vmin, scale.vmax)):  # round ends, e.g. -1 ... 1
        bar.set_ticks(np.linspace(scale.vmin, scale.vmax, 5))
    else:
        bar.locator = MaxNLocator(nbins=5)
    bar.set_label(f"{scale.label} [{scale.vmin:.3g}, {scale.vmax:.3g}]", fontsize=9)
    bar.ax.tick_params(labelsize=L.TICK_PT)
    return fig


def single_layer_strip(
    layer_similarities: np.ndarray,
    *,
    layer: int | None = None,
    title: str = "",
    segments: Sequence = (),
    positions: np.ndarray | None = None,
    tokens: Sequence[str] | None = None,
    mode: str = "seed",
    cmap: str = DEFAULT_SINGLE_CMAP,
    dpi: float = DEFAULT_DPI,
    token_labels: bool = False,
    notes: Sequence[str] = (),
) -> Figure:
    """One layer (the middle one, num_layers // 2, by default) as a min-max normalised strip.

    layer_similarities: [num_layers, T] (or a [T] row, taken as that layer).
    The row is normalised to [0, 1] (dark red = highest with YlOrRd); the title states the
    original range as 'Range: [lo, hi]'. A constant row draws as zeros, never NaN.
    """
    data = np.asarray(layer_similarities, dtype=np.float32)
    if data.ndim == 1:
        data = data[np.newaxis, :]
        layer = 0 if layer is None else layer
        num_layers = None
    else:
        data = _as_matrix(data)
        num_layers = data.shape[0]
    if layer is None:
        layer = data.shape[0] // 2
    num_columns = data.shape[1]
    empty = _empty(title, mode, data.shape[0], num_columns, dpi)
    if empty is not None:
        return empty
    row = data[layer] if num_layers is not None else data[0]
    normalised, lo, hi = normalise_row(row)
    range_text = f"Range: [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "Range: n/a (no finite value)"
    of_layers = f"layer {layer} of {num_layers} (middle)" if num_layers else f"layer {layer}"
    if num_layers and layer != num_layers // 2:
        of_layers = f"layer {layer} of {num_layers}"
    fig, ax, image, lay = _framed(
        normalised[np.newaxis, :], cmap, 0.0, 1.0, title_parts=[
            title, of_layers, f"{num_columns} tokens", range_text, f"similarity: {mode}",
            _bad_note(count_bad(row), row.size)],
        notes=notes, segments=segments, positions=positions, tokens=tokens, token_labels=token_labels, dpi=dpi,
        strip=True)
    ax.set_yticks([0])
    ax.set_yticklabels([f"layer {layer}"], fontsize=L.TICK_PT)
    cax = fig.add_axes(lay.cbar)
    bar = fig.colorbar(image, cax=cax, orientation="horizontal")
    bar.set_ticks([0, 0.5, 1])
    bar.ax.tick_params(labelsize=L.TICK_PT)
    bar.ax.set_title("normalised: 0 = layer min, 1 = layer max", fontsize=8, loc="left")
    return fig


def save_figure(fig: Figure, path, fmt: str = "png", dpi: float | None = None) -> None:
    """Write `fig` to `path` in `fmt` (png, svg, pdf) without bbox cropping (sizes are already set)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing.*")
        warnings.filterwarnings("ignore", message=".*missing from font.*")
        kwargs = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
        fig.savefig(path, format=fmt, dpi=dpi or fig.dpi, **kwargs)
