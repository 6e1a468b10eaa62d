"""`compare_captures`: two captures of the same problems, aligned by problem number, hand-off name and
original cache position.

    >>> result = compare_captures("captures/knn_off.h5", "captures/knn_on.h5")
    >>> result.table            # one row per problem and hand-off (DataFrame)
    >>> result.knn.dropped      # kNN-filtered vs unfiltered: every dropped column (or None)

Problems are matched by number (a number whose question differs is refused), hand-offs by name
(with '#2' for a name's second occurrence in a problem) and columns by original cache position:
a column whose position is in one capture only (kNN dropped it) is counted as only_a / only_b,
never paired with a neighbour. Differences are B - A over the common columns.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from capture.format import CaptureReader, number_ranges
from capture.text import shorten
from render.figures import LITERAL

from .knn_dropped import (
    KnnDropReport,
    KnnSettings,
    KnnTables,
    filtered_side,
    knn_figure,
)
from .parallel import run_chunks
from .source import (
    AnalysisError,
    check_names,
    chunks,
    parse_names,
    parse_problems,
    still_writing_note,
    stream,
)

COMPARE_COLUMNS = ["problem", "handoff", "present", "columns_a", "columns_b", "common", "only_a", "only_b",
                   "max_abs_diff", "mean_abs_diff", "nan_mismatches", "token_mismatches", "wasserstein_mean",
                   "wasserstein_max"]
LAYER_COLUMNS = ["problem", "handoff", "layer", "mean_a", "mean_b", "max_abs_diff", "mean_abs_diff", "wasserstein"]


def wasserstein_by_layer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1-Wasserstein distance between row l of `a` [L, Ta] and row l of `b` [L, Tb], for every l: [L].

    Each row's distribution is its finite values (NaN where either row has none). Rows without
    NaN are done together (one sort for all layers); others go through scipy.stats.wasserstein_distance.
    """
    from scipy.stats import wasserstein_distance

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    num_layers = a.shape[0]
    out = np.full(num_layers, np.nan)
    if a.shape[1] == 0 or b.shape[1] == 0:
        return out
    clean = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    rows = np.flatnonzero(clean)
    if len(rows):
        out[rows] = _wasserstein_rows(a[rows], b[rows])
    for layer in np.flatnonzero(~clean):
        u, v = a[layer][np.isfinite(a[layer])], b[layer][np.isfinite(b[layer])]
        if len(u) and len(v):
            out[layer] = wasserstein_distance(u, v)
    return out


def _wasserstein_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 = integral of |F_a - F_b| for each row pair of finite [R, n] and [R, m]: both rows' values in one
    sorted [R, n + m] array; F_a and F_b at each value count how many of the values up to it came from a and
    from b (within a run of equal values the width is 0, so their order there does not matter)."""
    n, m = a.shape[1], b.shape[1]
    values = np.concatenate([a, b], axis=1)  # [R, n + m]
    order = np.argsort(values, axis=1)
    ordered = np.take_along_axis(values, order, axis=1)
    from_a = order < n
    cdf_a = np.cumsum(from_a, axis=1)[:, :-1] / n
    cdf_b = np.cumsum(~from_a, axis=1)[:, :-1] / m
    return (np.abs(cdf_a - cdf_b) * np.diff(ordered, axis=1)).sum(axis=1)


@dataclass
class _Shown:
    """What a difference heatmap needs for one shown problem and hand-off."""

    problem: int
    label: str
    difference: np.ndarray  # [L, U] B - A over the union of positions, NaN where a column is in one only
    positions: np.ndarray  # [U]
    segments: list
    only: np.ndarray  # [U] 'a', 'b' or ''


@dataclass
class Comparison:
    a: Path
    b: Path
    settings: dict
    notes: list[str]
    table: pd.DataFrame
    layers: pd.DataFrame
    knn: KnnTables | None
    problems_only_a: list[int]
    problems_only_b: list[int]
    _shown: list = field(repr=False, default_factory=list)

    @property
    def identical(self) -> bool:
        """Every hand-off in both, same positions, and all differences 0."""
        t = self.table
        return bool(len(t)) and bool((t["present"] == "both").all() and (t["only_a"] == 0).all()
                                     and (t["only_b"] == 0).all() and (t["max_abs_diff"].fillna(0) == 0).all()
                                     and (t["nan_mismatches"] == 0).all())

    @property
    def num_figures(self) -> int:
        return len(self.labels) + len(self._shown) + (1 if self.knn is not None else 0)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(self.table["handoff"]))

    def summary(self) -> dict:
        import json

        def records(table):
            return json.loads(table.to_json(orient="records"))
        per_handoff = (self.table.groupby("handoff", sort=False)
                       .agg(problems=("problem", "size"), common=("common", "sum"), only_a=("only_a", "sum"),
                            only_b=("only_b", "sum"), max_abs_diff=("max_abs_diff", "max"),
                            mean_abs_diff=("mean_abs_diff", "mean"), wasserstein_mean=("wasserstein_mean", "mean"))
                       .reset_index())
        out = {"a": str(self.a), "b": str(self.b), "settings": self.settings, "notes": self.notes,
               "identical": self.identical, "problems_compared": int(self.table["problem"].nunique()),
               "problems_only_a": self.problems_only_a, "problems_only_b": self.problems_only_b,
               "per_handoff": records(per_handoff), "compare": records(self.table)}
        if self.knn is not None:
            checked = self.knn.summary["kept_are_top"].dropna()
            out["knn"] = {"filtered": self.knn.filtered, "layer": self.knn.layer,
                          "settings": asdict(self.knn.settings),
                          "scores_match_unfiltered_mode": self.knn.scores_match,
                          "dropped_columns": len(self.knn.dropped),
                          "kept_are_top": {"checked": len(checked), "true": int(checked.sum())},
                          "by_segment": records(self.knn.by_segment)}
        return out

    def figures(self):
        """(file name, Figure) pairs: per hand-off the per-layer differences over problems, a difference
        heatmap per shown problem and hand-off, and the kNN figure when there is a kNN report."""
        for label in self.labels:
            yield f"compare_{_safe(label)}.png", layer_shift_figure(self.layers, label, self.a.name, self.b.name)
        for shown in self._shown:
            yield (f"difference_{_safe(shown.label)}_problem{shown.problem}.png",
                   difference_heatmap(shown, self.a.name, self.b.name))
        if self.knn is not None:
            yield "knn_dropped.png", knn_figure(self.knn)


def _safe(label: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "unnamed"


def _check_pair(a: CaptureReader, b: CaptureReader, notes: list[str]) -> None:
    """Refuse captures that cannot be compared; note differences that are allowed."""
    if a.num_layers != b.num_layers:
        raise AnalysisError(f"{a.path} has {a.num_layers} layers and {b.path} has {b.num_layers}: compare needs "
                            "captures with the same number of layers")
    for reader in (a, b):
        if not reader.problem_numbers:
            raise AnalysisError(f"{reader.path} has no committed problems; nothing to compare")
        note = still_writing_note(reader)
        if note:
            notes.append(note)
    ma, mb = a.attrs.get("model_name"), b.attrs.get("model_name")
    if ma != mb:
        notes.append(f"note: different models ({ma} and {mb}, {a.num_layers} layers each): layers are compared "
                     "by number and columns by position; token_mismatches counts positions holding other tokens")
    sa, sb = a.attrs.get("similarity") or "seed", b.attrs.get("similarity") or "seed"
    if sa != sb:
        notes.append(f"note: different similarity modes ({sa} and {sb}): differences compare unlike values")


def _common_problems(a: CaptureReader, b: CaptureReader, wanted: set[int] | None, notes: list[str]):
    qa, qb = a.questions(), b.questions()
    for number in sorted(qa.keys() & qb.keys()):
        if qa[number] != qb[number]:
            raise AnalysisError(f"problem {number} differs: {a.path} asks {shorten(qa[number])!r} and {b.path} asks "
                                f"{shorten(qb[number])!r}; compare needs captures of the same problems")
    only_a, only_b = sorted(qa.keys() - qb.keys()), sorted(qb.keys() - qa.keys())
    common = [n for n in a.problem_numbers if n in qb]
    if wanted is not None:
        common = [n for n in common if n in wanted]
        only_a = [n for n in only_a if n in wanted]
        only_b = [n for n in only_b if n in wanted]
    if not common:
        raise AnalysisError(f"{a.path} ({number_ranges(a.problem_numbers)}) and {b.path} "
                            f"({number_ranges(b.problem_numbers)}) have no selected problem in common")
    if only_a:
        notes.append(f"note: problems {number_ranges(only_a)} are in {a.path} only")
    if only_b:
        notes.append(f"note: problems {number_ranges(only_b)} are in {b.path} only")
    return common, only_a, only_b


class _PairStats:
    """Fills the per-problem and per-layer tables from aligned hand-off pairs."""

    def __init__(self):
        self.rows: list[dict] = []
        self.layer_rows: dict[str, list] = {c: [] for c in LAYER_COLUMNS}

    def missing(self, problem: int, label: str, ha, hb) -> None:
        self.rows.append({"problem": problem, "handoff": label, "present": "a" if ha is not None else "b",
                          "columns_a": ha.num_columns if ha is not None else 0,
                          "columns_b": hb.num_columns if hb is not None else 0, "common": 0,
                          "only_a": ha.num_columns if ha is not None else 0,
                          "only_b": hb.num_columns if hb is not None else 0, "max_abs_diff": np.nan,
                          "mean_abs_diff": np.nan, "nan_mismatches": 0, "token_mismatches": 0,
                          "wasserstein_mean": np.nan, "wasserstein_max": np.nan})

    def add(self, problem: int, label: str, ha, hb):
        """Returns (common positions, columns in a, columns in b)."""
        pa, pb = np.asarray(ha.positions), np.asarray(hb.positions)
        common, ia, ib = np.intersect1d(pa, pb, assume_unique=True, return_indices=True)
        A = np.asarray(ha.layer_similarities, dtype=np.float32)
        B = np.asarray(hb.layer_similarities, dtype=np.float32)
        num_layers = A.shape[0]
        Ac, Bc = A[:, ia], B[:, ib]
        fa, fb = np.isfinite(Ac), np.isfinite(Bc)
        both = fa & fb
        diff = np.abs(Bc.astype(np.float64) - Ac)
        diff[~both] = np.nan
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                layer_max = np.nanmax(diff, axis=1) if diff.shape[1] else np.full(num_layers, np.nan)
                layer_mean = np.nanmean(diff, axis=1) if diff.shape[1] else np.full(num_layers, np.nan)
                mean_a = np.nanmean(A, axis=1) if A.shape[1] else np.full(num_layers, np.nan)
                mean_b = np.nanmean(B, axis=1) if B.shape[1] else np.full(num_layers, np.nan)
        count = both.sum()
        shift = wasserstein_by_layer(A, B)
        tokens_a, tokens_b = ha.tokens, hb.tokens
        mismatched = sum(tokens_a[i] != tokens_b[j] for i, j in zip(ia.tolist(), ib.tolist()))
        self.rows.append({
            "problem": problem, "handoff": label, "present": "both", "columns_a": len(pa), "columns_b": len(pb),
            "common": len(common), "only_a": len(pa) - len(common), "only_b": len(pb) - len(common),
            "max_abs_diff": float(np.nanmax(diff)) if count else np.nan,
            "mean_abs_diff": float(np.nansum(diff) / count) if count else np.nan,
            "nan_mismatches": int((fa ^ fb).sum()), "token_mismatches": int(mismatched),
            "wasserstein_mean": float(np.nanmean(shift)) if np.isfinite(shift).any() else np.nan,
            "wasserstein_max": float(np.nanmax(shift)) if np.isfinite(shift).any() else np.nan})
        rows = self.layer_rows
        rows["problem"].append(np.full(num_layers, problem))
        rows["handoff"].append(np.full(num_layers, label, dtype=object))
        rows["layer"].append(np.arange(num_layers))
        rows["mean_a"].append(mean_a)
        rows["mean_b"].append(mean_b)
        rows["max_abs_diff"].append(layer_max)
        rows["mean_abs_diff"].append(layer_mean)
        rows["wasserstein"].append(shift)
        return common, ia, ib

    def merge(self, other: _PairStats) -> None:
        self.rows += other.rows
        for column, values in other.layer_rows.items():
            self.layer_rows[column] += values

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        table = pd.DataFrame(self.rows, columns=COMPARE_COLUMNS)
        if self.layer_rows["layer"]:
            layers = pd.DataFrame({c: np.concatenate(v) for c, v in self.layer_rows.items()})
        else:
            layers = pd.DataFrame(columns=LAYER_COLUMNS)
        return table, layers


def _shown(problem, label, ha, hb, common, ia, ib) -> _Shown:
    union = np.union1d(ha.positions, hb.positions)
    num_layers = ha.layer_similarities.shape[0]
    difference = np.full((num_layers, len(union)), np.nan)
    at = np.searchsorted(union, common)
    difference[:, at] = (np.asarray(hb.layer_similarities, dtype=np.float64)[:, ib]
                         - np.asarray(ha.layer_similarities, dtype=np.float64)[:, ia])
    only = np.full(len(union), "", dtype=object)
    only[~np.isin(union, hb.positions)] = "a"
    only[~np.isin(union, ha.positions)] = "b"
    # segments are column ranges of one capture; they fit the union when its positions are that capture's
    segments = (hb.segments if len(union) == hb.num_columns else ha.segments if len(union) == ha.num_columns
                else [])
    return _Shown(problem, label, difference, union, list(segments), only)


@dataclass(frozen=True)
class _Options:
    """What a worker needs to compare a chunk of problems (picklable)."""

    a: Path
    b: Path
    wanted: tuple | None
    side: str | None  # which capture is kNN-filtered
    knn: KnnSettings | None
    knn_layer: int
    unfiltered_mode: str
    shown: frozenset


class _Parts:
    def __init__(self, options: _Options):
        self.stats = _PairStats()
        self.report = (KnnDropReport(options.knn, options.knn_layer, options.unfiltered_mode)
                       if options.side is not None else None)
        self.shown: list[_Shown] = []
        self.labels: list[str] = []
        self.names: list[str] = []  # every hand-off name seen, wanted or not

    def merge(self, other: _Parts) -> None:
        self.stats.merge(other.stats)
        if self.report is not None:
            self.report.merge(other.report)
        self.shown += other.shown
        self.labels += [n for n in other.labels if n not in self.labels]
        self.names += [n for n in other.names if n not in self.names]


def _compare_chunk(numbers: list[int], options: _Options) -> _Parts:
    """Compare one chunk of problems (runs in a worker process, or in this one)."""
    parts = _Parts(options)
    with CaptureReader(options.a) as ra, CaptureReader(options.b) as rb:
        for number in numbers:
            handoffs_a = {label: h for _, label, _, h in stream(ra, number, options.wanted, parts.names)}
            handoffs_b = {label: h for _, label, _, h in stream(rb, number, options.wanted, parts.names)}
            if parts.report is not None:
                parts.report.start_problem()
            for label in dict.fromkeys([*handoffs_a, *handoffs_b]):
                if label not in parts.labels:
                    parts.labels.append(label)
                ha, hb = handoffs_a.get(label), handoffs_b.get(label)
                if ha is None or hb is None:
                    parts.stats.missing(number, label, ha, hb)
                    continue
                common_positions, ia, ib = parts.stats.add(number, label, ha, hb)
                if parts.report is not None:
                    parts.report.add(number, label, *((ha, hb) if options.side == "a" else (hb, ha)))
                if number in options.shown:
                    parts.shown.append(_shown(number, label, ha, hb, common_positions, ia, ib))
    return parts


def compare_captures(a, b, *, problems=None, transitions=None, show: int = 2, jobs: int = 0, progress: bool = True,
                     warn=None) -> Comparison:
    """Compare capture `b` with capture `a` (see the module docstring); raises AnalysisError (one line).

    problems: numbers or a spec like '1-5,9' (default: every problem in both); transitions: hand-off
    names (default: all); show: problems (the first common ones) that get difference heatmaps;
    jobs: worker processes (0: one per core).
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    if show < 0:
        raise AnalysisError(f"--show must be 0 or more, got {show}")
    wanted = parse_problems(problems)
    names = parse_names(transitions)
    a, b = Path(a), Path(b)
    notes: list[str] = []
    with CaptureReader(a) as ra, CaptureReader(b) as rb:
        _check_pair(ra, rb, notes)
        common, only_a, only_b = _common_problems(ra, rb, wanted, notes)
        num_layers = ra.num_layers
        side = filtered_side(ra.attrs, rb.attrs)
        filtered_attrs, unfiltered_attrs = (ra.attrs, rb.attrs) if side == "a" else (rb.attrs, ra.attrs)
    for line in notes:
        warn(line)
    knn_layer = num_layers // 2
    options = _Options(a, b, tuple(names) if names is not None else None, side,
                       KnnSettings.from_attrs(filtered_attrs) if side is not None else None, knn_layer,
                       str(unfiltered_attrs.get("similarity") or "seed"), frozenset(common[:show]))
    results = run_chunks(_compare_chunk, chunks(common), (options,), jobs, progress,
                         f"compare {a.name} vs {b.name}", len)
    parts = results[0]
    for later in results[1:]:
        parts.merge(later)
    for line in check_names(f"{a} and {b}", names, parts.names):
        notes.append(line)
        warn(f"warning: {line}")
    table, layers = parts.stats.tables()
    knn = None
    if parts.report is not None:
        report = parts.report
        knn = KnnTables(report.settings, side, knn_layer, report.scores_match, report.dropped(), report.summary(),
                        report.by_segment())
    settings = {"problems": common, "transitions": names, "num_layers": num_layers, "show": show,
                "knn_layer": knn_layer}
    return Comparison(a, b, settings, notes, table, layers, knn, only_a, only_b, parts.shown)


def t_interval(values) -> tuple[float, float]:
    """The 95 % t interval of the mean of `values` (the mean itself, twice, for fewer than 2 values)."""
    from scipy.special import stdtrit

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean
    half = float(stdtrit(len(values) - 1, 0.975) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean - half, mean + half


def layer_shift_figure(layers: pd.DataFrame, label: str, name_a: str, name_b: str):
    """Seaborn lines over problems (mean and 95 % t interval, as in the profile) by layer: mean |B - A| on
    common columns, and the Wasserstein distance between the two captures' value distributions. The
    interval is computed, not bootstrapped: seaborn's bootstrap took 7.8 s under cProfile for 256 problems
    and grows with the problems."""
    import seaborn as sns

    from render.figures import new_figure

    part = layers[layers["handoff"] == label]
    fig = new_figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    for ax, column, title in ((left, "mean_abs_diff", "mean |B − A| over common columns"),
                              (right, "wasserstein", "Wasserstein distance of the layer's values")):
        data = part[["layer", column]].dropna()
        if len(data):
            sns.lineplot(data=data, x="layer", y=column, ax=ax, errorbar=t_interval, marker="o", markersize=3)
        ax.set_title(title, fontsize=8, **LITERAL)
        ax.set_xlabel("layer")
        ax.set_ylabel(column)
    n = part["problem"].nunique()
    fig.suptitle(f"{label} · A = {name_a} · B = {name_b} · {n} problems (mean and 95 % CI)", fontsize=9,
                 **LITERAL)
    fig.tight_layout()
    return fig


def difference_heatmap(shown: _Shown, name_a: str, name_b: str):
    """B - A at every layer over the union of both captures' positions (original positions on the x axis);
    columns in one capture only are grey."""
    from render.figures import multi_layer_heatmap

    finite = np.abs(shown.difference[np.isfinite(shown.difference)])
    top = float(finite.max()) if len(finite) and finite.max() > 0 else 1e-3
    only_a, only_b = int((shown.only == "a").sum()), int((shown.only == "b").sum())
    fig = multi_layer_heatmap(
        shown.difference, title=f"{shown.label} · problem {shown.problem} · B − A", segments=shown.segments,
        positions=None, mode="difference", cmap="RdBu_r", vmin=-top, vmax=top,
        notes=[f"A = {name_a}, B = {name_b}", f"grey: in A only ({only_a}) or B only ({only_b}), e.g. kNN-dropped"])
    if not fig.axes:
        return fig
    ax = fig.axes[0]
    ticks = ax.get_xticks()
    ticks = ticks[(ticks >= 0) & (ticks < len(shown.positions))].astype(int)
    ax.set_xticks(ticks, [str(int(shown.positions[t])) for t in ticks])
    ax.set_xlabel("original cache position", fontsize=9)
    if len(fig.axes) > 1:
        fig.axes[1].set_ylabel(f"B − A [{-top:.3g}, {top:.3g}]", fontsize=9)
    return fig
