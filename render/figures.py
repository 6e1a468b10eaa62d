"""Figures: each a small function of arrays returning a matplotlib Figure.

By default every figure is a `NotebookFigure` (a `matplotlib.figure.Figure`) bound to its
own Agg canvas, never registered with pyplot: nothing is shared between figures, nothing
needs closing beyond dropping it, and importing this module never touches the user's
backend. Jupyter still shows a returned figure inline (`NotebookFigure._repr_png_`).

Pass `ax=` (an Axes, or a `SubplotSpec` to make one) to draw into a figure of your own,
e.g. two hand-offs, or kNN on and off, on one grid; `columns=(start, stop)` draws a
window of a hand-off's columns on their true axis.

    >>> fig = multi_layer_heatmap(layer_similarities, title="Planner → Critic · problem 1")
    >>> fig.savefig("heatmap.png")
    >>> fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), layout="constrained")
    >>> plot_handoff(handoff_a, ax=top); plot_handoff(handoff_b, ax=bottom, columns=(100, 200))

Text that comes from a capture file (titles, agent and model names, tokens) is drawn as
text, never as mathtext or TeX. ±Inf cells get their own colours (black / white) and are
counted apart from NaN (grey) in the title.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb, to_rgba
from matplotlib.figure import Figure
from matplotlib.gridspec import SubplotSpec
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation, blended_transform_factory

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
POS_INF_COLOR = "#000000"
NEG_INF_COLOR = "#ffffff"
LITERAL = {"parse_math": False, "usetex": False}  # text from a file: never mathtext, never TeX


@dataclass
class RenderInfo:
    """What a figure function drew, attached to the Figure as `fig.render_info` and to its heatmap
    axes as `ax.render_info` (for callers and tests).

    values: [rows, T] the values as coloured (for a strip: the normalised row, shape [1, T]).
    layout: the geometry (`layout.Layout`), e.g. `layout.heat_pixels(dpi)` finds the map in a PNG.
    column_offset: true index of the first drawn column (a window's start; 0 for a whole hand-off).
    readout_strip: the texts the segment band carries over latent segments (their top readout tokens).
    """

    values: np.ndarray
    cmap: str
    vmin: float
    vmax: float
    layout: L.Layout
    column_offset: int = 0
    readout_strip: tuple[str, ...] = ()


class NotebookFigure(Figure):
    """A Figure on its own Agg canvas that Jupyter/IPython shows inline as a PNG, without pyplot."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        save_figure(self, buffer, "png")
        return buffer.getvalue()


# -- small helpers -----------------------------------------------------------------------

def new_figure(width_in: float, height_in: float, dpi: float = DEFAULT_DPI) -> Figure:
    """A Figure with its own Agg canvas (never registered with pyplot)."""
    fig = NotebookFigure(figsize=(width_in, height_in), dpi=dpi)
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


def count_nonfinite(values: np.ndarray) -> tuple[int, int, int]:
    """(NaN, +Inf, -Inf) cell counts of `values`."""
    values = np.asarray(values)
    return (int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(values == np.inf)),
            int(np.count_nonzero(values == -np.inf)))


def _bad_notes(values: np.ndarray) -> list[str]:
    """Title parts for NaN, +Inf and -Inf cells, e.g. ['3 NaN cells (grey)', '1 +Inf cell (black)']."""
    nan, pos_inf, neg_inf = count_nonfinite(values)

    def cells(n: int) -> str:
        return "cell" if n == 1 else "cells"

    notes = []
    if nan:
        notes.append(f"all {nan} cells NaN (grey)" if nan == values.size else f"{nan} NaN {cells(nan)} (grey)")
    if pos_inf:
        notes.append(f"{pos_inf} +Inf {cells(pos_inf)} (black)")
    if neg_inf:
        notes.append(f"{neg_inf} −Inf {cells(neg_inf)} (white)")
    return notes


def _gap_note(gaps: L.Gaps) -> str:
    if not len(gaps):
        return ""
    runs = "run" if len(gaps) == 1 else "runs"
    return f"kNN removed {gaps.removed} positions in {len(gaps)} {runs} (▲ under the map)"


# -- transforms: x in columns, y in inches from the heatmap's frame --------------------------

def _inches_from(ax, y_frac: float):
    """y in inches measured from the axes' y = `y_frac` line (1: its top, 0: its bottom)."""
    return ax.figure.dpi_scale_trans + ScaledTranslation(0, y_frac, ax.transAxes)


def _above(ax, x_in_data: bool = True):
    return blended_transform_factory(ax.transData if x_in_data else ax.transAxes, _inches_from(ax, 1.0))


def _below(ax, x_in_data: bool = True):
    return blended_transform_factory(ax.transData if x_in_data else ax.transAxes, _inches_from(ax, 0.0))


# -- shared pieces --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Window:
    """The columns drawn: `offset` is the true index of the first; segments/gaps in true columns."""

    offset: int
    num_columns: int
    segments: list          # segments clipped to the window, true column indices
    gaps: L.Gaps            # gap columns in true column indices

    def relative(self) -> list:
        """The window's segments with columns counted from the window's start (for label placement)."""
        return [_Clipped(s.agent, s.kind, s.start - self.offset, s.stop - self.offset) for s in self.segments]


@dataclass(frozen=True)
class _Clipped:
    agent: str
    kind: str
    start: int
    stop: int


def _window(data: np.ndarray, segments, positions, tokens, columns, column_offset: int):
    """Cut `data` [rows, T] (and positions, tokens) to `columns` = (start, stop) of a whole hand-off,
    or take it as already cut, starting at true column `column_offset`. Returns (data, positions, tokens, window)."""
    total = data.shape[1]
    full_positions = None if positions is None else np.asarray(positions)
    if columns is not None:
        if column_offset:
            raise ValueError("give columns=(start, stop) of the whole hand-off, or column_offset for cut data, "
                             "not both")
        start, stop = (int(c) for c in columns)
        if not 0 <= start < stop <= total:
            raise ValueError(f"columns=({start}, {stop}) is not a window of the {total} columns "
                             "(0 <= start < stop <= T)")
        data = data[:, start:stop]
        positions = None if full_positions is None else full_positions[start:stop]
        tokens = None if tokens is None else list(tokens)[start:stop]
        gaps = L.find_gaps(full_positions)
        keep = (gaps.columns >= start) & (gaps.columns < stop) if len(gaps) else np.zeros(0, dtype=bool)
    else:
        start = int(column_offset)
        if start < 0:
            raise ValueError(f"column_offset must be 0 or more, got {start}")
        gaps = L.find_gaps(full_positions)
        gaps = L.Gaps(gaps.columns + start, gaps.removed)
        keep = gaps.columns > start if start else np.ones(len(gaps), dtype=bool)  # before a cut: unknown
    if len(gaps):
        removed = _removed_in(full_positions, gaps.columns - (0 if columns is not None else start), keep)
        gaps = L.Gaps(gaps.columns[keep], removed)
    stop = start + data.shape[1]
    clipped = [_Clipped(s.agent, s.kind, max(int(s.start), start), min(int(s.stop), stop))
               for s in (segments or ()) if min(int(s.stop), stop) > max(int(s.start), start)]
    return data, positions, tokens, _Window(start, data.shape[1], clipped, gaps)


def _cut(values: Sequence[str] | None, columns: tuple[int, int] | None) -> list[str] | None:
    """`values` [T] cut to the window `columns` (already checked by `_window`), or as given."""
    if values is None:
        return None
    return list(values) if columns is None else list(values)[int(columns[0]):int(columns[1])]


def _removed_in(positions: np.ndarray, columns: np.ndarray, keep: np.ndarray) -> int:
    """Positions removed just before the kept gap `columns` (indices into `positions`)."""
    positions = np.asarray(positions, dtype=np.int64)
    before = np.where(columns > 0, positions[columns] - positions[np.maximum(columns - 1, 0)] - 1, positions[columns])
    return int(before[keep].sum())


def _draw_band(ax, lay: L.Layout, window: _Window, placed: Sequence) -> None:
    """The coloured segment band above the heatmap frame, with labels above it.

    Drawn by the heatmap axes outside its frame (x in columns, y in inches above the frame).
    """
    y0, y1 = lay.band
    over = _above(ax)
    segments = window.segments
    bars = [(s.start - 0.5, s.stop - s.start) for s in segments]
    colours = [agent_color(s.agent, s.kind) for s in segments]
    ax.broken_barh([(window.offset - 0.5, window.num_columns)], (y0, y1 - y0), transform=over, clip_on=False,
                   facecolors=[_UNCOVERED], edgecolors="0.3", linewidth=0.5)
    ax.broken_barh(bars, (y0, y1 - y0), transform=over, clip_on=False, facecolors=colours,
                   edgecolors="white", linewidth=0.8)
    for label in placed:
        ax.text(window.offset + label.x, y1 + 0.25 * lay.label_row + label.row * lay.label_row, label.text,
                transform=over, ha="center", va="bottom", fontsize=L.SEGMENT_LABEL_PT, clip_on=False, **LITERAL)
    ax.text(-0.006, (y0 + y1) / 2, "segments", transform=_above(ax, x_in_data=False), ha="right", va="center",
            fontsize=7, color="0.3", clip_on=False)


READOUT_STRIP_PT = 6
READOUT_SEPARATOR = "·"


def readout_strip_texts(segments: Sequence, readout_tokens: Sequence[str], plot_w_in: float,
                        points: float = READOUT_STRIP_PT) -> list[tuple[float, str]]:
    """(centre column, text) of the readout strip over each latent segment: its columns' top readout tokens,
    in order, joined by "·", as many as fit in its room, halfway to the neighbouring strips and inside the
    plot ("…" after the last that fits; a segment where not even one fits gets none). A text is centred on
    its segment, or moved inwards as far as it must to stay in its room.

    segments: with columns counted from the window's start; readout_tokens: [T] of the window, "" where none.
    """
    num_columns = len(readout_tokens)
    if not num_columns:
        return []
    in_per_column = plot_w_in / num_columns
    wanted = []
    for seg in segments:
        tops = [L.format_token(t, 8) for t in readout_tokens[max(seg.start, 0):seg.stop] if t]
        if seg.kind == "latent" and tops:
            wanted.append(((seg.start + seg.stop) / 2 * in_per_column, tops))
    wanted.sort(key=lambda w: w[0])
    placed = []
    for i, (centre, tops) in enumerate(wanted):  # each gets the room halfway to its neighbours
        lo = 0.0 if i == 0 else (centre + wanted[i - 1][0]) / 2
        hi = plot_w_in if i == len(wanted) - 1 else (centre + wanted[i + 1][0]) / 2
        room = hi - lo - 0.06
        for n in range(len(tops), 0, -1):
            text = READOUT_SEPARATOR.join(tops[:n]) + ("" if n == len(tops) else "…")
            half = L.text_width_in(text, points) / 2
            if 2 * half <= room:
                at = min(max(centre, lo + 0.03 + half), hi - 0.03 - half)  # kept inside its room
                placed.append((at / in_per_column - 0.5, text))
                break
    return placed


def _draw_readout_strip(ax, lay: L.Layout, window: _Window, readout_tokens: Sequence[str]) -> tuple[str, ...]:
    """The top readout tokens of each latent segment, written across the segment band (as text, never
    mathtext) on a light box; returns the texts drawn."""
    y0, y1 = lay.band
    over = _above(ax)
    placed = readout_strip_texts(window.relative(), readout_tokens, lay.plot_width_in)
    for x, text in placed:
        ax.text(window.offset + x, (y0 + y1) / 2, text, transform=over, ha="center", va="center",
                fontsize=READOUT_STRIP_PT, clip_on=False, zorder=5,
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
                **LITERAL)
    return tuple(text for _, text in placed)


def _draw_rug(ax, lay: L.Layout, gaps: L.Gaps) -> None:
    """Marks just under the heatmap frame where kNN filtering removed cache positions."""
    ax.plot(gaps.columns - 0.5, np.full(len(gaps), lay.rug), transform=_below(ax), clip_on=False, linestyle="none",
            marker="^", markersize=5, color="black")
    ax.text(-0.006, lay.rug, "kNN gaps", transform=_below(ax, x_in_data=False), ha="right", va="center",
            fontsize=7, color="0.3", clip_on=False)


X_AXES = ("column", "position")  # what the x tick labels count: columns of the hand-off, or original cache positions


def _x_axis(ax, lay: L.Layout, window: _Window, tokens: Sequence[str] | None, positions=None,
            x_axis: str = "column") -> None:
    """Ticks and label of the x axis: true column numbers, the original cache positions at those columns
    (`x_axis="position"`; after kNN the positions have gaps, so the ticks stay at the chosen columns and
    their labels are the positions there), or the token strings when they fit."""
    first, num_columns = window.offset, window.num_columns
    ax.tick_params(axis="x", pad=lay.tick_pad_pt)
    if lay.token_labels and tokens is not None:
        ax.set_xticks(first + np.arange(num_columns))
        ax.set_xticklabels([L.format_token(t) for t in tokens], rotation=90, fontsize=L.TOKEN_LABEL_PT, **LITERAL)
        ax.set_xlabel("KV cache token (column; tick labels are the cached tokens)", fontsize=9)
        return
    ticks = L.column_ticks(num_columns, lay.plot_width_in, first)
    ax.tick_params(axis="x", labelsize=L.TICK_PT)
    if x_axis == "position" and positions is not None and len(positions) == num_columns:
        at = np.asarray(positions, dtype=np.int64)
        ax.set_xticks(ticks, [str(int(at[t - first])) for t in ticks])
        gaps = " (kNN gaps: positions jump where ▲)" if len(window.gaps) else ""
        ax.set_xlabel(f"original KV cache position {int(at[0])} … {int(at[-1])}{gaps}", fontsize=9)
    else:
        ax.set_xticks(ticks)
        ax.set_xlabel(f"KV cache token (column {first} … {first + num_columns - 1})", fontsize=9)


def _check_x_axis(x_axis: str) -> None:
    if x_axis not in X_AXES:
        raise ValueError(f"unknown x axis {x_axis!r}; use one of {', '.join(X_AXES)}")


COLOUR_CHUNK_CELLS = 1 << 20  # cells coloured at a time: matplotlib's float64 RGBA of a chunk is 32 MB


def _colour_cells(data: np.ndarray, raw: np.ndarray, mappable: ScalarMappable) -> np.ndarray:
    """[rows, T, 4] uint8 colours of `data`; cells that are ±Inf in `raw` get their own colours.

    Coloured a block of columns at a time into the one uint8 image, so a wide hand-off costs
    4 bytes per cell here instead of the ~40 of `to_rgba`'s float64 intermediates.
    """
    rows, columns = data.shape
    rgba = np.empty((rows, columns, 4), dtype=np.uint8)
    step = max(1, COLOUR_CHUNK_CELLS // max(rows, 1))
    for start in range(0, columns, step):
        block = slice(start, start + step)
        rgba[:, block] = mappable.to_rgba(data[:, block], bytes=True)
        for value, colour in ((np.inf, POS_INF_COLOR), (-np.inf, NEG_INF_COLOR)):
            cells = raw[:, block] == value
            if cells.any():
                rgba[:, block][cells] = np.round(np.asarray(to_rgba(colour)) * 255).astype(np.uint8)
    return rgba


OVERSAMPLE = 8  # image columns kept per screen pixel when a hand-off is far wider than its plot


def _reduce_columns(image: np.ndarray, pixels: int) -> np.ndarray:
    """[rows, T, 4] uint8 -> [rows, ceil(T / b), 4]: blocks of b columns averaged (RGBA), when T is over
    OVERSAMPLE times `pixels`; else `image` itself.

    Matplotlib's antialiased resampling would average those columns into one pixel anyway, but it works
    on float copies of the whole image (~50 bytes a cell); averaging first keeps OVERSAMPLE columns per
    pixel for it, so the figure looks the same and a 10^6-column hand-off fits in memory.
    """
    rows, columns, _ = image.shape
    block = columns // (OVERSAMPLE * max(pixels, 1))
    if block < 2:
        return image
    width = -(-columns // block)
    reduced = np.empty((rows, width, 4), dtype=np.uint8)
    step = max(1, (COLOUR_CHUNK_CELLS // max(rows * block, 1))) * block  # whole blocks per chunk
    for start in range(0, columns, step):
        chunk = image[:, start:start + step].astype(np.float32)
        full = chunk.shape[1] // block * block
        out = start // block
        if full:
            means = chunk[:, :full].reshape(rows, full // block, block, 4).mean(axis=2)
            reduced[:, out:out + full // block] = np.round(means).astype(np.uint8)
        if full < chunk.shape[1]:  # the last, shorter block
            reduced[:, -1] = np.round(chunk[:, full:].mean(axis=1)).astype(np.uint8)
    return reduced


def _heatmap(ax, lay: L.Layout, data: np.ndarray, raw: np.ndarray, cmap_name: str, vmin: float, vmax: float,
             window: _Window, placed: Sequence, tokens, positions=None, x_axis: str = "column") -> ScalarMappable:
    """Heatmap, segment band, boundaries, gap marks and x axis in `ax`; returns the mappable for the colour bar."""
    rows, num_columns = data.shape
    first = window.offset
    # Colour the cells once here (NaN -> the colormap's 'bad' grey, ±Inf their own) and hand matplotlib
    # an RGBA image: resampling bytes is about 3x faster than normalising floats at every draw.
    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=colormap(cmap_name))
    extra = {"interpolation_stage": "rgba"} if lay.interpolation == "antialiased" else {}
    image = _colour_cells(data, raw, mappable)
    if lay.interpolation == "antialiased":
        image = _reduce_columns(image, int(lay.plot_width_in * ax.figure.dpi))
    ax.imshow(image, aspect="auto", origin="lower", interpolation=lay.interpolation,
              extent=(first - 0.5, first + num_columns - 0.5, -0.5, rows - 0.5), **extra)
    ax.set_xlim(first - 0.5, first + num_columns - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    cuts = [c + first for c in L.segment_boundaries(window.relative(), num_columns)]
    if cuts:
        ax.vlines(np.asarray(cuts) - 0.5, -0.5, rows - 0.5, colors="black", linewidth=0.7, alpha=0.6)
    if lay.band is not None:
        _draw_band(ax, lay, window, placed)
    if lay.rug is not None:
        _draw_rug(ax, lay, window.gaps)
    _x_axis(ax, lay, window, tokens, positions, x_axis)
    return mappable


def _title_lines(parts: Sequence[str], width_in: float) -> list[str]:
    return L.wrap_title(parts, max(width_in - 0.4, 3.0))


def _token_labels(tokens, num_columns: int, wanted: bool) -> tuple[bool, int]:
    """(draw token labels?, longest label in characters): only with one token per column that fits."""
    if not wanted or tokens is None or len(tokens) != num_columns or num_columns > L.max_labelled_tokens():
        return False, 0
    return True, max((len(L.format_token(t)) for t in tokens), default=1)


def _target_axes(ax) -> Axes | None:
    """The caller's axes: an Axes as given, a SubplotSpec made into one, None for a figure of our own."""
    if ax is None or isinstance(ax, Axes):
        return ax
    if isinstance(ax, SubplotSpec):
        return ax.get_gridspec().figure.add_subplot(ax)
    raise TypeError(f"ax must be a matplotlib Axes or SubplotSpec, got {type(ax).__name__}")


def _axes_inches(ax) -> tuple[float, float]:
    width, height = ax.get_position().size
    fig_w, fig_h = ax.figure.get_size_inches()
    return max(width * fig_w, 0.5), max(height * fig_h, 0.3)


def _empty(title: str, mode: str, rows: int, num_columns: int, dpi: float, ax) -> Figure | None:
    """The figure that says there is nothing to draw, or None when there is something."""
    if num_columns and rows:
        return None
    what = "empty cache (T = 0)" if num_columns == 0 else "no layers in this capture"
    heading = f"{title} · similarity: {mode}" if title else f"similarity: {mode}"
    if ax is None:
        return empty_figure(heading, what, dpi)
    ax.set_axis_off()
    ax.set_title("\n".join(_title_lines([heading], _axes_inches(ax)[0])), fontsize=L.TITLE_PT, loc="left", **LITERAL)
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.35")
    ax.render_info = None
    return ax.figure


def _framed(data: np.ndarray, raw: np.ndarray, cmap_name: str, vmin: float, vmax: float, *,
            title_parts: Sequence[str], notes: Sequence[str], window: _Window, tokens, token_labels: bool,
            dpi: float, ax=None, strip: bool = False, positions=None, x_axis: str = "column", readout_tokens=None):
    """What both figures share: layout, title, heatmap, segment band, gap marks and x axis.

    data: `[rows, T]` values to draw; raw: `[rows, T]` the values whose ±Inf cells get their own colours;
    title_parts: the title's lines before the gap note and `notes`; ax: the caller's axes or None;
    positions: [T] the drawn columns' original cache positions (or None), the tick labels when x_axis="position".
    readout_tokens: [T] the drawn columns' top readout tokens ("" where none) or None: the segment band carries
    them when token labels were asked for but do not fit.
    Returns (figure, heat axes, mappable for the colour bar, layout).
    """
    rows, num_columns = data.shape
    wants_labels = token_labels
    gaps = window.gaps
    segments = window.relative()
    parts = [*title_parts, _gap_note(gaps), *notes]
    if ax is None:
        token_labels, label_chars = _token_labels(tokens, num_columns, token_labels)
        placed = L.place_segment_labels(segments, num_columns, L.plot_width_in(num_columns, token_labels))
        width = L.figure_width_in(num_columns, token_labels, strip=strip)
        lines = _title_lines(parts, width)
        lay = L.heatmap_layout(rows, num_columns, dpi, title_lines=len(lines), has_segments=bool(segments),
                               has_gaps=bool(len(gaps)), token_labels=token_labels, strip=strip,
                               token_label_chars=label_chars,
                               label_rows=max((p.row for p in placed), default=-1) + 1)
        fig = new_figure(lay.width_in, lay.height_in, dpi)
        ax = fig.add_axes(lay.heat)
        fig.suptitle("\n".join(lines), y=lay.title_y, va="top", fontsize=L.TITLE_PT, linespacing=1.3, **LITERAL)
    else:
        fig = ax.figure
        axes_w, axes_h = _axes_inches(ax)
        token_labels = _token_labels(tokens, num_columns, token_labels)[0]
        lay = L.axes_layout(axes_w, axes_h, rows, num_columns, fig.dpi, fig_w_in=fig.get_size_inches()[0],
                            fig_h_in=fig.get_size_inches()[1], heat=tuple(ax.get_position().bounds),
                            has_segments=bool(segments), has_gaps=bool(len(gaps)), token_labels=token_labels)
        placed = L.place_segment_labels(segments, num_columns, axes_w)
        label_rows = max((p.row for p in placed), default=-1) + 1
        pad = L.band_height_pt(label_rows) if segments else 6
        ax.set_title("\n".join(_title_lines(parts, axes_w)), fontsize=L.TITLE_PT, loc="left", pad=pad,
                     linespacing=1.3, **LITERAL)
    mappable = _heatmap(ax, lay, data, raw, cmap_name, vmin, vmax, window, placed, tokens, positions, x_axis)
    strip_texts = ()
    if (wants_labels and not lay.token_labels and lay.band is not None and readout_tokens is not None
            and len(readout_tokens) == num_columns):
        strip_texts = _draw_readout_strip(ax, lay, window, readout_tokens)
    info = RenderInfo(values=data, cmap=cmap_name, vmin=vmin, vmax=vmax, layout=lay, column_offset=window.offset,
                      readout_strip=strip_texts)
    ax.render_info = info
    fig.render_info = info
    return fig, ax, mappable, lay


def _as_matrix(layer_similarities) -> np.ndarray:
    data = np.asarray(layer_similarities, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"layer_similarities must be [num_layers, T], got shape {data.shape}")
    return data


def _window_note(window: _Window, full_columns: int) -> str:
    if window.offset == 0 and window.num_columns == full_columns:
        return ""
    return f"columns {window.offset} … {window.offset + window.num_columns - 1}"


# -- figures ----------------------------------------------------------------------------------

def empty_figure(title: str, message: str, dpi: float = DEFAULT_DPI) -> Figure:
    """A small figure that says why there is nothing to draw (e.g. 'empty cache (T = 0)')."""
    fig = new_figure(6.4, 1.8, dpi)
    lines = _title_lines([title], 6.4)
    fig.suptitle("\n".join(lines), y=0.93, va="top", fontsize=L.TITLE_PT, **LITERAL)
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
    ax: Axes | SubplotSpec | None = None,
    columns: tuple[int, int] | None = None,
    column_offset: int = 0,
    x_axis: str = "column",
    readout_tokens: Sequence[str] | None = None,
) -> Figure:
    """Every layer's similarity to every cached token, layer 0 at the bottom.

    layer_similarities: [num_layers, T] floats (NaN drawn grey, +Inf black, -Inf white, each counted
              in the title).
    segments: objects with .agent, .kind, .start, .stop (columns [start, stop) of one agent's
              prompt or latent steps), drawn as a coloured band with labels and boundary lines.
    positions: [T] original cache positions; gaps (kNN-removed positions) are marked under the map.
    tokens: T token strings, written as tick labels when `token_labels` and they fit.
    mode: similarity mode; cosine modes use RdYlGn on -1 ... 1, attention modes a
          sequential colormap on 0 ... max (see colormaps.scale_for); cmap/vmin/vmax override.
    title: heading such as 'Planner → Critic · problem 3'; shape, mode and notes are appended.
    ax: draw into this Axes (or a new one at this SubplotSpec) of your figure, with a colour bar
        beside it; returns that figure. Without it the figure is sized to the data.
    columns: (start, stop) to draw only that window of the T columns, on their true column numbers
        (all arguments are then the whole hand-off's). column_offset: the true number of the
        first column when `layer_similarities` (and positions, tokens) are already a window;
        segments stay in the hand-off's column numbers either way.
    x_axis: "column" labels x ticks with column numbers; "position" with the original cache positions
        at those columns (`positions` needed; after kNN filtering they have gaps).
    readout_tokens: T strings, each latent column's top readout token ("" where none; cut like `tokens`):
        with `token_labels` asked for but too many columns for them, the segment band carries them, a strip
        over each latent segment (`render_info.readout_strip` lists the texts drawn).
    """
    _check_x_axis(x_axis)
    data = _as_matrix(layer_similarities)
    ax = _target_axes(ax)
    full_columns = data.shape[1]
    data, positions, tokens, window = _window(data, segments, positions, tokens, columns, column_offset)
    readout_tokens = _cut(readout_tokens, columns)
    num_layers, num_columns = data.shape
    empty = _empty(title, mode, num_layers, num_columns, dpi, ax)
    if empty is not None:
        return empty
    scale = scale_for(mode, data, cmap, vmin, vmax)
    fig, ax, image, lay = _framed(
        data, data, scale.cmap, scale.vmin, scale.vmax, title_parts=[
            title, f"{num_layers} layers × {num_columns} tokens", _window_note(window, full_columns),
            f"similarity: {mode}", *_bad_notes(data)],
        notes=notes, window=window, tokens=tokens, token_labels=token_labels, dpi=dpi, ax=ax, positions=positions,
        x_axis=x_axis, readout_tokens=readout_tokens)
    plot_h_in = _axes_inches(ax)[1]
    ax.set_yticks(L.layer_ticks(num_layers, plot_h_in))
    ax.tick_params(axis="y", labelsize=L.TICK_PT)
    ax.set_ylabel("layer (0 = first, at the bottom)", fontsize=9)
    if lay.cbar is not None:
        bar = fig.colorbar(image, cax=fig.add_axes(lay.cbar))
    else:
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.015)
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
    ax: Axes | SubplotSpec | None = None,
    columns: tuple[int, int] | None = None,
    column_offset: int = 0,
    x_axis: str = "column",
    readout_tokens: Sequence[str] | None = None,
) -> Figure:
    """One layer (the middle one, num_layers // 2, by default) as a min-max normalised strip.

    layer_similarities: [num_layers, T] (or a [T] row, taken as that layer).
    The row is normalised to [0, 1] (dark red = highest with YlOrRd); the title states the
    original range as 'Range: [lo, hi]' (of the drawn columns). A constant row draws as zeros,
    never NaN; ±Inf cells are drawn black / white and left out of the range.
    ax, columns, column_offset, x_axis, readout_tokens: as for `multi_layer_heatmap`.
    """
    _check_x_axis(x_axis)
    data = np.asarray(layer_similarities, dtype=np.float32)
    ax = _target_axes(ax)
    if data.ndim == 1:
        data = data[np.newaxis, :]
        layer = 0 if layer is None else layer
        num_layers = None
    else:
        data = _as_matrix(data)
        num_layers = data.shape[0]
    if layer is None:
        layer = data.shape[0] // 2
    full_columns = data.shape[1]
    data, positions, tokens, window = _window(data, segments, positions, tokens, columns, column_offset)
    readout_tokens = _cut(readout_tokens, columns)
    num_columns = data.shape[1]
    empty = _empty(title, mode, data.shape[0], num_columns, dpi, ax)
    if empty is not None:
        return empty
    row = data[layer] if num_layers is not None else data[0]
    normalised, lo, hi = normalise_row(row)
    range_text = f"Range: [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "Range: n/a (no finite value)"
    of_layers = f"layer {layer} of {num_layers} (middle)" if num_layers else f"layer {layer}"
    if num_layers and layer != num_layers // 2:
        of_layers = f"layer {layer} of {num_layers}"
    fig, ax, image, lay = _framed(
        normalised[np.newaxis, :], row[np.newaxis, :], cmap, 0.0, 1.0, title_parts=[
            title, of_layers, f"{num_columns} tokens", _window_note(window, full_columns), range_text,
            f"similarity: {mode}", *_bad_notes(row)],
        notes=notes, window=window, tokens=tokens, token_labels=token_labels, dpi=dpi, ax=ax, strip=True,
        positions=positions, x_axis=x_axis, readout_tokens=readout_tokens)
    ax.set_yticks([0])
    ax.set_yticklabels([f"layer {layer}"], fontsize=L.TICK_PT)
    if lay.cbar is not None:
        bar = fig.colorbar(image, cax=fig.add_axes(lay.cbar), orientation="horizontal")
        bar.ax.set_title("normalised: 0 = layer min, 1 = layer max", fontsize=8, loc="left")
    else:
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.015)
        bar.set_label("normalised (0 = min, 1 = max)", fontsize=8)
    bar.set_ticks([0, 0.5, 1])
    bar.ax.tick_params(labelsize=L.TICK_PT)
    return fig


def plot_handoff(handoff, kind: str = "multi", *, title: str | None = None, problem: int | None = None,
                 **options) -> Figure:
    """`multi_layer_heatmap` (kind "multi") or `single_layer_strip` ("single") of a `capture.format.Handoff`.

    Passes its matrix, segments, positions and tokens; the title defaults to 'Planner → Critic'
    (with ' · problem N' when `problem` is given). `options`: the figure function's keywords
    (ax, columns, mode, cmap, token_labels, ...).
    """
    if kind not in ("multi", "single"):
        raise ValueError(f"unknown figure kind {kind!r}; use 'multi' or 'single'")
    if title is None:
        title = pretty_handoff(handoff.from_agent, handoff.to_agent)
        if problem is not None:
            title += f" · problem {problem}"
    draw = multi_layer_heatmap if kind == "multi" else single_layer_strip
    return draw(handoff.layer_similarities, title=title, segments=handoff.segments, positions=handoff.positions,
                tokens=handoff.tokens, **options)


def save_figure(fig: Figure, path, fmt: str = "png", dpi: float | None = None) -> None:
    """Write `fig` to `path` in `fmt` (png, svg, pdf) without bbox cropping (sizes are already set)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing.*")
        warnings.filterwarnings("ignore", message=".*missing from font.*")
        kwargs = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
        fig.savefig(path, format=fmt, dpi=dpi or fig.dpi, **kwargs)
