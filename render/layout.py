"""Figure geometry: sizes, axes rectangles, ticks, segment labels and kNN gaps.

Everything here is plain arithmetic on shapes (no drawing), so it is cheap and testable.

Sizing rule (all lengths in inches; at the default 100 dpi one inch is 100 px):

* the heatmap area is `T * COLUMN_IN` wide (0.08 in = 8 px a token at 100 dpi), at
  least `MIN_PLOT_W_IN` and at most `MAX_PLOT_W_IN` (20 in = 2,000 px at 100 dpi);
  so up to T = 2,000 every token is at least one pixel wide at 100 dpi, and the
  figure never grows past ~23 in whatever T is;
* past that, columns are narrower than a pixel and are drawn with matplotlib's
  anti-aliased resampling (neighbouring columns are averaged in colour space), so
  a single outlier column fades rather than vanishes at random as it would with
  'nearest' sampling; up to that point 'nearest' keeps every cell crisp;
* the multi-layer heatmap is `num_layers * ROW_IN` tall within [2.4, 6] in;
* with --token-labels the column width is `LABELLED_COLUMN_IN` (0.14 in) so a
  rotated 6.5 pt label fits each column; that works up to
  `max_labelled_tokens()` (142) columns, beyond which labels are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

COLUMN_IN = 0.08
LABELLED_COLUMN_IN = 0.14
MIN_PLOT_W_IN = 4.8
MAX_PLOT_W_IN = 20.0
ROW_IN = 0.12
MIN_PLOT_H_IN = 2.4
MAX_PLOT_H_IN = 6.0
STRIP_H_IN = 0.7

LEFT_IN = 0.8
RIGHT_IN = 1.15            # colour bar and its label
CBAR_GAP_IN = 0.15
CBAR_W_IN = 0.18
TITLE_LINE_IN = 0.19
TITLE_PAD_IN = 0.12
LABEL_ROW_IN = 0.16        # one row of segment labels
SEGMENT_LABEL_ROWS = 2
BAND_IN = 0.14             # coloured segment band above the heatmap
RUG_IN = 0.11              # kNN gap rug under the heatmap
TICKS_IN = 0.22
XLABEL_IN = 0.3
TOKEN_LABEL_IN = 0.75      # extra room under the axis for rotated token labels
STRIP_CBAR_IN = 0.55       # horizontal colour bar under a single-layer strip

TITLE_PT = 10
SEGMENT_LABEL_PT = 7.5
TOKEN_LABEL_PT = 6.5
TICK_PT = 8
CHAR_EM = 0.6              # average glyph width of DejaVu Sans, in em (generous)


def max_labelled_tokens() -> int:
    """Largest T whose token strings fit as tick labels (one column of LABELLED_COLUMN_IN each)."""
    return int(MAX_PLOT_W_IN / LABELLED_COLUMN_IN)


def plot_width_in(num_columns: int, token_labels: bool = False) -> float:
    """Width of the heatmap area in inches for `num_columns` tokens (see module docstring)."""
    per_column = LABELLED_COLUMN_IN if token_labels else COLUMN_IN
    return min(max(num_columns * per_column, MIN_PLOT_W_IN), MAX_PLOT_W_IN)


def text_width_in(text: str, points: float) -> float:
    """A generous estimate of the width of one line of `text` at `points` size, in inches."""
    return len(text) * points * CHAR_EM / 72.0


@dataclass
class Layout:
    """Where everything goes. Rects are (left, bottom, width, height) in figure fractions."""

    width_in: float
    height_in: float
    heat: tuple[float, float, float, float]
    band: tuple[float, float] | None    # (y0, y1) of the segment band, inches above the heatmap's top
    rug: float | None                   # y of the kNN gap marks, inches from the heatmap's bottom (< 0)
    cbar: tuple[float, float, float, float] | None  # None: drawn beside a caller's axes (`axes_layout`)
    label_row: float                    # height of one segment-label row, in inches
    tick_pad_pt: float                  # x tick label padding (room for the rug)
    title_y: float | None               # figure fraction of the top of the title (None: the axes' title)
    plot_width_in: float
    interpolation: str                  # 'nearest' or 'antialiased'
    token_labels: bool                  # token strings fit and are drawn

    def heat_pixels(self, dpi: float) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the heatmap area in image pixels, y counted from the top."""
        left, bottom, width, height = self.heat
        w_px, h_px = self.width_in * dpi, self.height_in * dpi
        x0, x1 = left * w_px, (left + width) * w_px
        y1, y0 = (1 - bottom) * h_px, (1 - bottom - height) * h_px
        return int(math.ceil(x0)), int(math.ceil(y0)), int(math.floor(x1)), int(math.floor(y1))


def _interpolation(num_columns: int, num_rows: int, plot_w_in: float, plot_h_in: float, dpi: float) -> str:
    too_narrow = num_columns > plot_w_in * dpi
    too_short = num_rows > plot_h_in * dpi
    return "antialiased" if (too_narrow or too_short) else "nearest"


def figure_width_in(num_columns: int, token_labels: bool = False, strip: bool = False) -> float:
    """Total figure width in inches (heatmap area plus margins and colour bar)."""
    labels_fit = token_labels and 0 < num_columns <= max_labelled_tokens()
    width = LEFT_IN + plot_width_in(num_columns, labels_fit) + (0.35 if strip else RIGHT_IN)
    return max(width, 6.0) if strip else width


def heatmap_layout(num_layers: int, num_columns: int, dpi: float, *, title_lines: int = 2,
                   has_segments: bool = True, has_gaps: bool = False, token_labels: bool = False,
                   strip: bool = False, token_label_chars: int = 12,
                   label_rows: int = SEGMENT_LABEL_ROWS) -> Layout:
    """Geometry of a multi-layer heatmap (strip=False) or a single-layer strip (strip=True).

    Top to bottom: title, segment labels, segment band, heatmap, kNN gap marks, x ticks
    (or token labels), x label, and for a strip a horizontal colour bar. The colour bar of
    a multi-layer heatmap stands at its right. Band, labels and gap marks are drawn by the
    heatmap axes itself outside its frame (one axes is much faster than three).
    """
    labels_fit = token_labels and 0 < num_columns <= max_labelled_tokens()
    plot_w = plot_width_in(num_columns, labels_fit)
    if strip:
        plot_h = STRIP_H_IN
    else:
        plot_h = min(max(num_layers * ROW_IN, MIN_PLOT_H_IN), MAX_PLOT_H_IN)

    top = TITLE_PAD_IN + title_lines * TITLE_LINE_IN + 0.08
    if has_segments:
        top += label_rows * LABEL_ROW_IN + BAND_IN + 0.06
    bottom = TICKS_IN + XLABEL_IN + 0.12
    if has_gaps:
        bottom += RUG_IN
    if labels_fit:  # rotated labels: as tall as the longest one is wide
        bottom += min(TOKEN_LABEL_IN, text_width_in("x" * token_label_chars, TOKEN_LABEL_PT)) + 0.05
    if strip:
        bottom += STRIP_CBAR_IN
    width = figure_width_in(num_columns, token_labels, strip)
    height = top + plot_h + bottom

    def rect(left_in, bottom_in, w_in, h_in):
        return (left_in / width, bottom_in / height, w_in / width, h_in / height)

    heat_bottom = bottom
    heat = rect(LEFT_IN, heat_bottom, plot_w, plot_h)
    band, rug = _band_and_rug(has_segments, has_gaps)
    if strip:
        cbar_w = min(3.0, plot_w)
        cbar = rect(LEFT_IN + plot_w - cbar_w, 0.28, cbar_w, 0.11)
    else:
        cbar = rect(LEFT_IN + plot_w + CBAR_GAP_IN, heat_bottom, CBAR_W_IN, plot_h)
    title_y = 1 - TITLE_PAD_IN / height
    rows = 1 if strip else num_layers
    return Layout(
        width_in=width, height_in=height, heat=heat, band=band, rug=rug, cbar=cbar, title_y=title_y,
        label_row=LABEL_ROW_IN, tick_pad_pt=_tick_pad_pt(has_gaps),
        plot_width_in=plot_w, interpolation=_interpolation(num_columns, rows, plot_w, plot_h, dpi),
        token_labels=labels_fit,
    )


def _band_and_rug(has_segments: bool, has_gaps: bool) -> tuple[tuple[float, float] | None, float | None]:
    """(band y0, y1 in inches above the heatmap) and (rug y in inches below it), None where absent."""
    band = (0.03, 0.03 + BAND_IN) if has_segments else None
    rug = -(RUG_IN / 2 + 0.01) if has_gaps else None
    return band, rug


def _tick_pad_pt(has_gaps: bool) -> float:
    return 3.5 + (RUG_IN * 72 if has_gaps else 0)


def band_height_pt(label_rows: int) -> float:
    """Room (points) that the segment band and `label_rows` rows of labels take above a heatmap."""
    return (0.03 + BAND_IN + 0.25 * LABEL_ROW_IN + label_rows * LABEL_ROW_IN + 0.04) * 72


def axes_layout(axes_w_in: float, axes_h_in: float, num_rows: int, num_columns: int, dpi: float, *,
                fig_w_in: float, fig_h_in: float, heat: tuple[float, float, float, float],
                has_segments: bool = True, has_gaps: bool = False, token_labels: bool = False) -> Layout:
    """Geometry of a heatmap drawn into a caller's axes of `axes_w_in` x `axes_h_in` inches.

    The axes keeps its place (`heat`, figure fractions); band, labels and gap marks go around
    it at fixed distances in inches, the colour bar beside it (taken from its width by matplotlib).
    Token labels are drawn when the axes gives each column LABELLED_COLUMN_IN.
    """
    band, rug = _band_and_rug(has_segments, has_gaps)
    labels_fit = token_labels and 0 < num_columns <= int(axes_w_in / LABELLED_COLUMN_IN)
    return Layout(
        width_in=fig_w_in, height_in=fig_h_in, heat=heat, band=band, rug=rug, cbar=None, title_y=None,
        label_row=LABEL_ROW_IN, tick_pad_pt=_tick_pad_pt(has_gaps), plot_width_in=axes_w_in,
        interpolation=_interpolation(num_columns, num_rows, axes_w_in, axes_h_in, dpi), token_labels=labels_fit,
    )


# -- ticks -----------------------------------------------------------------------------

def nice_step(span: int, max_ticks: int) -> int:
    """Smallest step of the form 1, 2, 5 x 10^k giving at most `max_ticks` ticks over `span`."""
    if span <= 0 or max_ticks <= 0:
        return 1
    raw = span / max_ticks
    magnitude = 10 ** max(0, math.floor(math.log10(raw))) if raw >= 1 else 1
    for factor in (1, 2, 5, 10):
        step = factor * magnitude
        if step >= raw:
            return int(step)
    return int(10 * magnitude)


def column_ticks(num_columns: int, plot_w_in: float, offset: int = 0) -> np.ndarray:
    """Column indices to label on the x axis: at most one every 1.1 in, on a 1-2-5 grid.

    offset: the first column's true index (a window of a hand-off); ticks stay on the grid's multiples.
    """
    if num_columns <= 0:
        return np.zeros(0, dtype=int)
    max_ticks = max(2, min(20, int(plot_w_in / 1.1)))
    step = nice_step(num_columns, max_ticks)
    first = -(-offset // step) * step
    return np.arange(first, offset + num_columns, step)


def layer_ticks(num_layers: int, plot_h_in: float) -> np.ndarray:
    """Layer indices to label on the y axis: every layer when they fit, always 0 and usually L-1."""
    if num_layers <= 0:
        return np.zeros(0, dtype=int)
    max_ticks = max(2, int(plot_h_in / 0.3))
    step = nice_step(num_layers, max_ticks) if num_layers > max_ticks else 1
    ticks = list(range(0, num_layers, step))
    last = num_layers - 1
    if ticks[-1] != last and last - ticks[-1] > step // 2:
        ticks.append(last)
    return np.asarray(ticks)


# -- kNN gaps --------------------------------------------------------------------------

@dataclass(frozen=True)
class Gaps:
    """Where kNN filtering removed cache positions.

    columns: [G] column indices c such that positions removed lie just before column c
             (c = 0 means positions before the first kept one were removed).
    removed: total number of removed positions.
    """

    columns: np.ndarray
    removed: int

    def __len__(self) -> int:
        return int(self.columns.size)


def find_gaps(positions: np.ndarray | None) -> Gaps:
    """Gaps in the original cache positions ([T] ints, increasing) of a hand-off's columns."""
    if positions is None or len(positions) == 0:
        return Gaps(np.zeros(0, dtype=int), 0)
    positions = np.asarray(positions, dtype=np.int64)
    jumps = np.diff(positions) - 1
    before = np.concatenate([[max(int(positions[0]), 0)], np.maximum(jumps, 0)])
    columns = np.flatnonzero(before > 0)
    return Gaps(columns, int(before.sum()))


# -- segment labels --------------------------------------------------------------------

@dataclass(frozen=True)
class PlacedLabel:
    """A segment label: centred at column `x` (data units), in label row `row` (0 = nearest the band)."""

    x: float
    text: str
    row: int


def segment_label_candidates(agent: str, kind: str) -> list[str]:
    """Label texts from the longest to the shortest, e.g. 'planner latent', 'planner lat.', 'pl·lat'."""
    kind_short = {"prompt": "prm.", "latent": "lat."}.get(kind, kind[:4])
    return [f"{agent} {kind}", f"{agent} {kind_short}", f"{agent[:2]}·{kind[:3]}"]


def place_segment_labels(segments: Sequence, num_columns: int, plot_w_in: float,
                         points: float = SEGMENT_LABEL_PT, rows: int = SEGMENT_LABEL_ROWS) -> list[PlacedLabel]:
    """Place one label per segment without overlaps, greedily over `rows` rows.

    Each label is centred on its segment (kept inside the axis). If its longest text does
    not fit in any row, shorter texts are tried; a segment with no room gets no label
    (its colour in the segment band still shows it).
    """
    if num_columns <= 0 or not segments:
        return []
    in_per_column = plot_w_in / num_columns
    pad_in = 0.06
    right_edge = [-math.inf] * rows
    placed: list[PlacedLabel] = []
    for seg in sorted(segments, key=lambda s: (s.start, s.stop)):
        start, stop = max(0, int(seg.start)), min(num_columns, int(seg.stop))
        if stop <= start:
            continue
        centre_in = (start + stop) / 2 * in_per_column
        done = False
        for text in segment_label_candidates(seg.agent, seg.kind):
            half = text_width_in(text, points) / 2
            centre = min(max(centre_in, half), plot_w_in - half)
            for row in range(rows):
                if centre - half >= right_edge[row] + pad_in:
                    right_edge[row] = centre + half
                    placed.append(PlacedLabel(centre / in_per_column - 0.5, text, row))
                    done = True
                    break
            if done:
                break
    return placed


def segment_boundaries(segments: Sequence, num_columns: int) -> list[int]:
    """Columns where a new segment starts (excluding 0 and T): boundary lines go at x = c - 0.5."""
    cuts = sorted({int(s.start) for s in segments} | {int(s.stop) for s in segments})
    return [c for c in cuts if 0 < c < num_columns]


# -- tokens ----------------------------------------------------------------------------

def format_token(token: str, max_chars: int = 12) -> str:
    """A token string made short for a tick label, whitespace visible (drawn as text, never mathtext)."""
    text = token.replace("\n", "↵").replace("\t", "\\t").replace("\r", "\\r")
    if text.strip() == "":
        text = "␣" * min(len(text), 3) if text else "∅"
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def wrap_title(parts: Sequence[str], width_in: float, points: float = TITLE_PT) -> list[str]:
    """Join title `parts` with ' · ' into as few lines as fit `width_in` inches."""
    lines: list[str] = []
    current = ""
    for part in parts:
        if not part:
            continue
        candidate = f"{current} · {part}" if current else part
        if current and text_width_in(candidate, points) > width_in:
            lines.append(current)
            current = part
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines
