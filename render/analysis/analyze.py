"""`analyze_capture`: one streaming pass over a capture that fills every per-capture analysis.

    >>> result = analyze_capture("captures/run.h5", top=10)
    >>> result.profile            # layer x segment profile over problems (DataFrame)
    >>> result.figures()          # {file name: Figure}

The pass reads one hand-off at a time (`source.stream`) and folds it into the accumulators
(profile, distributions, top tokens, bands, strip ranges, the latent readout's steps); memory does
not grow with the matrices.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from capture.format import CaptureReader

from .bands import BandCollector, BandRule, bands_legend, mark_bands
from .distributions import LayerDistributions
from .parallel import run_chunks
from .profile import LayerSegmentProfile, profile_figure
from .readout import ReadoutSteps, agents_table, entropy_figure, entropy_table, summary_lines, tokens_table
from .scales import SCALES, LayerRanges, comparable_strip
from .source import (
    AnalysisError,
    check_layer,
    check_names,
    chunks,
    parse_names,
    parse_problems,
    select_problems,
    still_writing_note,
    stream,
)
from .top_tokens import TopTokens, top_tokens_figure

JSON_TOKENS = 1000  # rows of top_tokens_by_string in analysis.json (the CSV has them all)


@dataclass
class Analysis:
    """Everything `analyze_capture` found; tables are pandas DataFrames (see docs/analysis.md)."""

    capture: Path
    settings: dict
    run: dict
    notes: list[str]
    profile: pd.DataFrame
    profile_per_problem: pd.DataFrame
    distributions: pd.DataFrame
    top_tokens: pd.DataFrame
    top_tokens_by_string: pd.DataFrame
    bands: pd.DataFrame
    band_layers: pd.DataFrame
    band_segments: pd.DataFrame
    strip_ranges: dict
    labels: list[str]
    readout_top_k: int = 0
    readout_steps: pd.DataFrame | None = None  # None: the capture keeps no readout (see readout.py)
    readout_agents: pd.DataFrame | None = None
    readout_tokens: pd.DataFrame | None = None
    readout_entropy: pd.DataFrame | None = None
    readout_note: str | None = None  # why there is no readout section
    _distributions: LayerDistributions = field(repr=False, default=None)
    _bands: BandCollector = field(repr=False, default=None)
    _ranges: LayerRanges = field(repr=False, default=None)
    _shown: list = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        """The machine-readable form written as analysis.json: settings, run metadata, notes, the profile, the
        distributions, band counts and shares and the first `JSON_TOKENS` rows of the tokens by string (the
        per-problem tables, top tokens and bands are the CSV files)."""
        def records(table: pd.DataFrame) -> list[dict]:
            return json.loads(table.to_json(orient="records"))
        return {"capture": str(self.capture), "settings": self.settings, "run": self.run, "notes": self.notes,
                "handoffs": self.labels, "strip_ranges": self.strip_ranges,
                "layer_segment_profile": records(self.profile), "distributions": records(self.distributions),
                "top_tokens_by_string": records(self.top_tokens_by_string.head(JSON_TOKENS)),
                "band_counts": records(self.bands.groupby(["handoff", "type", "sign"], sort=False).size()
                                       .rename("count").reset_index()),
                "band_layers": records(self.band_layers),
                "band_segments": records(self.band_segments),
                "readout": None if self.readout_agents is None else {
                    "top_k": self.readout_top_k, "agents": records(self.readout_agents),
                    "tokens": records(self.readout_tokens.groupby("agent", sort=False).head(JSON_TOKENS)),
                    "entropy_by_step": records(self.readout_entropy)}}

    @property
    def has_readout(self) -> bool:
        """Whether the analysed hand-offs held latent steps with a readout (the readout tables have rows)."""
        return self.readout_agents is not None and len(self.readout_agents) > 0

    def readout_lines(self, show: int = 3) -> list[str]:
        """The readout section of the terminal report (empty without a readout)."""
        if not self.has_readout:
            return [f"Latent readout: {self.readout_note}"] if self.readout_note else []
        return summary_lines(self.readout_agents, self.readout_tokens, self.readout_entropy, show)

    @property
    def num_figures(self) -> int:
        return 3 * len(self.labels) + 2 * len(self._shown) + int(self.has_readout)

    def figures(self):
        """(file name, Figure) pairs, drawn one at a time: per hand-off label the profile, the distributions
        and the top tokens; per shown problem and hand-off a heatmap with its bands and a comparable strip."""
        layer = self.settings["layer"]
        for label in self.labels:
            safe = _safe(label)
            yield f"profile_{safe}.png", profile_figure(self.profile, label, self._bands.frequent_layers(label),
                                                        self.settings["similarity"])
            yield f"distributions_{safe}.png", self._distributions.figure(label)
            yield f"top_tokens_{safe}.png", top_tokens_figure(self.top_tokens_by_string, label,
                                                              _layer_text(self.settings))
        if self.has_readout:
            yield "readout_entropy.png", entropy_figure(self.readout_entropy)
        if not self._shown:
            return
        with CaptureReader(self.capture) as reader:
            for number, label, index in self._shown:
                handoff = next(reader.handoffs(number, [index]))
                safe = _safe(label)
                yield f"bands_{safe}_problem{number}.png", banded_heatmap(
                    handoff, self._bands.bands_of(number, label), f"{label} · problem {number}",
                    self.settings["similarity"])
                lo, hi = self._ranges.range_for(self.settings["strip_scale"], label,
                                                np.asarray(handoff.layer_similarities[layer], dtype=np.float64))
                yield f"strip_{safe}_problem{number}.png", comparable_strip(
                    handoff, layer, lo, hi, title=f"{label} · problem {number}", scale=self.settings["strip_scale"])


def _safe(label: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "unnamed"


def _layer_text(settings: dict) -> str:
    if settings["all_layers"]:
        return f"top/bottom {settings['top']} at every layer"
    return f"top/bottom {settings['top']} at layer {settings['layer']}"


def banded_heatmap(handoff, bands, title: str, mode: str):
    """The render stage's multi-layer heatmap of `handoff` with `bands` outlined on it."""
    from render.figures import multi_layer_heatmap

    fig = multi_layer_heatmap(handoff.layer_similarities, title=title, segments=handoff.segments,
                              positions=handoff.positions, mode=mode, notes=[bands_legend(bands)])
    if handoff.num_columns and fig.axes:
        mark_bands(fig.axes[0], bands)
    return fig


@dataclass(frozen=True)
class _Options:
    """What a worker needs to analyse a chunk of problems (picklable)."""

    path: Path
    num_layers: int
    layer: int
    top: int
    all_layers: bool
    mode: str
    rule: BandRule
    shown: frozenset
    wanted: tuple | None


class _Parts:
    """The accumulators of one chunk of problems; `merge` folds a later chunk in."""

    def __init__(self, options: _Options):
        self.profile = LayerSegmentProfile(options.num_layers)
        self.distributions = LayerDistributions(options.num_layers, options.mode)
        self.tops = TopTokens(range(options.num_layers) if options.all_layers else [options.layer], options.top)
        self.bands = BandCollector(options.num_layers, options.rule)
        self.ranges = LayerRanges(options.layer)
        self.readout = ReadoutSteps()
        self.shown: list[tuple[int, str, int]] = []
        self.names: list[str] = []
        self.labels: list[str] = []

    def add(self, number: int, index: int, label: str, name: str, handoff, keep: bool) -> None:
        matrix = np.asarray(handoff.layer_similarities, dtype=np.float32)
        finite = np.isfinite(matrix)
        clean = np.where(finite, matrix, np.float32(0))
        nan_matrix = matrix if finite.all() else np.where(finite, matrix, np.nan)
        self.profile.add(number, label, clean, finite, handoff)
        self.distributions.add(label, clean, finite, number, index)
        self.tops.add(number, label, nan_matrix, handoff)
        self.bands.add(number, label, nan_matrix, handoff, keep=keep)
        self.ranges.add(label, nan_matrix)
        self.readout.add(number, handoff)
        if keep:
            self.shown.append((number, label, index))
        if label not in self.labels:
            self.labels.append(label)

    def merge(self, other: _Parts) -> None:
        for name in ("profile", "distributions", "tops", "bands", "ranges", "readout"):
            getattr(self, name).merge(getattr(other, name))
        self.shown += other.shown
        self.names += [n for n in other.names if n not in self.names]
        self.labels += [n for n in other.labels if n not in self.labels]


def _analyze_chunk(numbers: list[int], options: _Options) -> _Parts:
    """Read and fold in one chunk of problems (runs in a worker process, or in this one)."""
    parts = _Parts(options)
    with CaptureReader(options.path) as reader:
        for number in numbers:
            for index, label, name, handoff in stream(reader, number, options.wanted, parts.names):
                parts.add(number, index, label, name, handoff, keep=number in options.shown)
    return parts


def analyze_capture(path, *, problems=None, transitions=None, layer: int | None = None, top: int = 10,
                    all_layers: bool = False, show: int = 2, strip_scale: str = "handoff",
                    rule: BandRule = BandRule(), jobs: int = 0, progress: bool = True, warn=None) -> Analysis:
    """Analyse the committed problems of one capture (see the module docstring).

    problems: numbers or a spec like '1-5,9'; transitions: hand-off names (None: all);
    layer: where top tokens and strips are taken (default num_layers // 2, kNN's layer);
    top: K of top/bottom tokens; all_layers: top tokens at every layer too;
    show: problems (the first ones) whose heatmaps with bands and strips `figures()` draws;
    strip_scale: 'strip', 'handoff' or 'capture' (see scales.py);
    jobs: worker processes (0: one per core; chunks of `source.CHUNK` problems each).
    Raises AnalysisError (one line) for bad input or an unreadable capture.
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    if top < 1:
        raise AnalysisError(f"--top must be at least 1, got {top}")
    if strip_scale not in SCALES:
        raise AnalysisError(f"unknown strip scale {strip_scale!r}; use one of {', '.join(SCALES)}")
    if show < 0:
        raise AnalysisError(f"--show must be 0 or more, got {show}")
    wanted = parse_problems(problems)
    names = parse_names(transitions)
    path = Path(path)
    with CaptureReader(path) as reader:
        attrs = reader.attrs
        num_layers = reader.num_layers
        layer = check_layer(reader, layer)
        numbers, notes = select_problems(reader, wanted)
        note = still_writing_note(reader)
        finished = bool(reader.finished_at)
        readout_top_k = reader.readout_top_k
    if note:
        notes.append(note)
    for line in notes:
        warn(line if line.startswith("note:") else f"warning: {line}")
    mode = str(attrs.get("similarity") or "seed")
    options = _Options(path, num_layers, layer, top, all_layers, mode, rule, frozenset(numbers[:show]),
                       tuple(names) if names is not None else None)
    blocks = chunks(numbers)
    results = run_chunks(_analyze_chunk, blocks, (options,), jobs, progress, f"analyze {path.name}", len)
    parts = results[0]
    for later in results[1:]:
        parts.merge(later)
    for line in check_names(path, names, parts.names):
        notes.append(line)
        warn(f"warning: {line}")
    readout = {}
    if readout_top_k:
        steps = parts.readout.table()
        readout = {"readout_steps": steps, "readout_agents": agents_table(steps), "readout_tokens": tokens_table(steps),
                   "readout_entropy": entropy_table(steps)}
        if not len(steps):
            readout["readout_note"] = "no analysed hand-off holds a latent step with a readout"
    else:
        readout["readout_note"] = ("the capture has no latent readout (captured with --readout_top_k 0, or before "
                                   "capture schema 2): skipped")
    if "readout_note" in readout:  # the report's readout section says it (not a warning)
        notes.append(f"note: latent readout: {readout['readout_note']}")
    top_table = parts.tops.table()
    settings = {"problems": list(numbers), "transitions": names, "layer": layer, "num_layers": num_layers,
                "top": top, "all_layers": all_layers, "show": show, "strip_scale": strip_scale, "similarity": mode,
                "band_rule": asdict(rule)}
    run = {k: attrs[k] for k in sorted(attrs) if k != "config"}
    run["finished"] = finished
    return Analysis(
        capture=path, settings=settings, run=run, notes=notes, profile=parts.profile.table(),
        profile_per_problem=parts.profile.per_problem(), distributions=parts.distributions.table(),
        top_tokens=top_table, top_tokens_by_string=parts.tops.by_token(top_table), bands=parts.bands.table(),
        band_layers=parts.bands.layer_shares(), band_segments=parts.bands.segment_shares(),
        strip_ranges=parts.ranges.as_dict(), labels=parts.labels, readout_top_k=readout_top_k, **readout,
        _distributions=parts.distributions, _bands=parts.bands, _ranges=parts.ranges, _shown=parts.shown)
