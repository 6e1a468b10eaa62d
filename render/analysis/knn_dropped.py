"""What kNN filtering dropped: a kNN-filtered capture against an unfiltered one of the same problems.

Columns are matched by original cache position. At each hand-off the filtered run trimmed the
cache it held then: the positions it kept at the previous hand-off plus the tokens added since
(the candidates; in the unfiltered capture, every position not already dropped at an earlier
hand-off). Of those, the `min_keep` most recent are always kept and the older ones are ranked by
the kNN score at the kNN layer (`num_layers // 2`). This report takes each candidate's score from
the unfiltered capture at that layer. That is the score kNN used exactly when the two runs held the
same cache before the trim (the first hand-off, with the unfiltered capture in the kNN score's
similarity mode: `exact_scores`); at later hand-offs the filtered run's earlier agents had read a
trimmed cache, so their latent steps differ and the check is approximate.

Tables:
- `dropped`: one row per column dropped at that hand-off: problem, handoff, position, column (in the
  unfiltered hand-off), token, agent, kind, value (score at the kNN layer), rank among the older
  candidates (1 = highest score), protected (one of the `min_keep` most recent; should never be dropped).
- `summary`: per problem and hand-off: candidates, kept, expected_kept (min(n, max(floor(n * percentage),
  min_keep))), dropped, dropped_earlier, protected_dropped, unexpected (filtered columns with no
  unfiltered counterpart), kept_min_score / dropped_max_score over the older candidates, kept_are_top
  (strategy top: every kept older column scores at least as high as every dropped one; bottom: at most
  as high; empty for random or when nothing was dropped), top_overlap (share of the kept older columns
  that are among as many best-ranked ones), exact_scores.
- `by_segment`: per hand-off and segment over problems: candidates, dropped, share_dropped, and the mean
  score of the dropped and of the kept candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .segments import column_segments

DROPPED_COLUMNS = ["problem", "handoff", "position", "column", "token", "agent", "kind", "value", "rank", "protected"]
SUMMARY_COLUMNS = ["problem", "handoff", "candidates", "kept", "expected_kept", "dropped", "dropped_earlier",
                   "protected_dropped", "unexpected", "kept_min_score", "dropped_max_score", "kept_are_top",
                   "top_overlap", "exact_scores"]
SEGMENT_COLUMNS = ["handoff", "agent", "kind", "candidates", "dropped", "share_dropped", "mean_value_dropped",
                   "mean_value_kept"]


def _truthy(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return str(value).strip().lower() in ("1", "true", "yes")


def filtered_side(attrs_a: dict, attrs_b: dict) -> str | None:
    """'a' or 'b' when exactly that capture was kNN-filtered (its `knn_filter` attribute), else None."""
    a, b = _truthy(attrs_a.get("knn_filter", False)), _truthy(attrs_b.get("knn_filter", False))
    return "a" if a and not b else "b" if b and not a else None


@dataclass(frozen=True)
class KnnSettings:
    """The filtered run's kNN settings (root attributes knn_percentage, knn_min_keep, knn_strategy, knn_score)."""

    percentage: float
    min_keep: int
    strategy: str
    score: str

    @classmethod
    def from_attrs(cls, attrs: dict) -> KnnSettings:
        return cls(float(attrs.get("knn_percentage") or 0.8), int(attrs.get("knn_min_keep") or 0),
                   str(attrs.get("knn_strategy") or "top"), str(attrs.get("knn_score") or "seed"))


class _Segment:
    def __init__(self):
        self.candidates = 0
        self.dropped = 0
        self.dropped_total = 0.0
        self.dropped_finite = 0
        self.kept_total = 0.0
        self.kept_finite = 0


class KnnDropReport:
    """Fed pair by pair (`add`), problem by problem (`start_problem` first); tables as in the module docstring."""

    def __init__(self, settings: KnnSettings, layer: int, unfiltered_mode: str):
        self.settings = settings
        self.layer = layer
        self.scores_match = settings.score == unfiltered_mode
        self._dropped: dict[str, list[np.ndarray]] = {c: [] for c in DROPPED_COLUMNS}  # one array per add
        self._summary: list[dict] = []
        self._segments: dict[tuple[str, str, str], _Segment] = {}
        self._absent = np.zeros(0, dtype=np.int64)
        self._first = True

    def start_problem(self) -> None:
        self._absent = np.zeros(0, dtype=np.int64)
        self._first = True

    def add(self, problem: int, label: str, filtered, unfiltered) -> None:
        """filtered, unfiltered: the same hand-off of one problem in the two captures."""
        settings = self.settings
        pu = np.asarray(unfiltered.positions, dtype=np.int64)
        pf = np.asarray(filtered.positions, dtype=np.int64)
        candidate = ~np.isin(pu, self._absent)
        kept = np.isin(pu, pf)
        cand_columns = np.flatnonzero(candidate)
        n = len(cand_columns)
        protected_count = min(settings.min_keep, n)
        protected = np.zeros(len(pu), dtype=bool)
        if protected_count:
            protected[cand_columns[n - protected_count:]] = True
        older = candidate & ~protected
        dropped = candidate & ~kept
        scores = np.asarray(unfiltered.layer_similarities[self.layer], dtype=np.float64) if len(pu) else np.zeros(0)
        older_columns = np.flatnonzero(older)
        # rank among the older candidates: 1 = highest score (NaN last), ties in column order
        order = older_columns[np.argsort(-np.nan_to_num(scores[older_columns], nan=-np.inf), kind="stable")]
        rank = np.zeros(len(pu), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        kept_older, dropped_older = older & kept, older & ~kept
        kept_scores, dropped_scores = scores[kept_older], scores[dropped_older]
        kept_are_top, overlap = self._check(order, kept, kept_scores, dropped_scores)
        segments = column_segments(unfiltered)
        dropped_columns = np.flatnonzero(dropped)
        agents = np.array([agent for agent, _ in segments.labels], dtype=object)
        kinds = np.array([kind for _, kind in segments.labels], dtype=object)
        places = segments.index[dropped_columns]
        count = len(dropped_columns)
        tokens = unfiltered.tokens
        for column, values in (
                ("problem", np.full(count, problem, dtype=np.int64)),
                ("handoff", np.full(count, label, dtype=object)),
                ("position", pu[dropped_columns]),
                ("column", dropped_columns.astype(np.int64)),
                ("token", np.array([tokens[c] for c in dropped_columns.tolist()], dtype=object)),
                ("agent", agents[places]),
                ("kind", kinds[places]),
                ("value", scores[dropped_columns]),
                ("rank", np.where(older[dropped_columns], rank[dropped_columns], 0)),
                ("protected", protected[dropped_columns])):
            self._dropped[column].append(values)
        for place, (agent, kind) in enumerate(segments.labels):
            mine = segments.index == place
            acc = self._segments.setdefault((label, agent, kind), _Segment())
            acc.candidates += int((mine & candidate).sum())
            acc.dropped += int((mine & dropped).sum())
            for mask, total, count in (((mine & dropped), "dropped_total", "dropped_finite"),
                                       ((mine & candidate & kept), "kept_total", "kept_finite")):
                values = scores[mask]
                values = values[np.isfinite(values)]
                setattr(acc, total, getattr(acc, total) + float(values.sum()))
                setattr(acc, count, getattr(acc, count) + len(values))
        expected = min(n, max(math.floor(n * settings.percentage + 1e-9), settings.min_keep))
        self._summary.append({
            "problem": problem, "handoff": label, "candidates": n, "kept": int((candidate & kept).sum()),
            "expected_kept": expected, "dropped": len(dropped_columns), "dropped_earlier": int((~candidate).sum()),
            "protected_dropped": int((protected & ~kept).sum()), "unexpected": int((~np.isin(pf, pu)).sum()),
            "kept_min_score": _finite_min(kept_scores), "dropped_max_score": _finite_max(dropped_scores),
            "kept_are_top": kept_are_top, "top_overlap": overlap,
            "exact_scores": bool(self._first and self.scores_match)})
        self._absent = pu[~kept]
        self._first = False

    def merge(self, other: KnnDropReport) -> None:
        """Fold in what `other` accumulated (over later problems)."""
        for column, values in other._dropped.items():
            self._dropped[column] += values
        self._summary += other._summary
        for key, theirs in other._segments.items():
            mine = self._segments.setdefault(key, _Segment())
            for name in vars(theirs):
                setattr(mine, name, getattr(mine, name) + getattr(theirs, name))

    def _check(self, order: np.ndarray, kept: np.ndarray, kept_scores, dropped_scores):
        """(kept_are_top, top_overlap) for the strategy; (None, None) where they do not apply."""
        strategy = self.settings.strategy
        if strategy not in ("top", "bottom") or not len(order):
            return None, None
        ranked = order if strategy == "top" else order[::-1]
        k = int(kept[order].sum())
        overlap = float(kept[ranked[:k]].sum() / k) if k else None
        if not len(dropped_scores) or not len(kept_scores):
            return None, overlap
        if strategy == "top":
            return bool(_finite_min(kept_scores) >= _finite_max(dropped_scores)), overlap
        return bool(_finite_max(kept_scores) <= _finite_min(dropped_scores)), overlap

    def dropped(self) -> pd.DataFrame:
        if not self._dropped["problem"]:
            return pd.DataFrame(columns=DROPPED_COLUMNS)
        return pd.DataFrame({c: np.concatenate(parts) for c, parts in self._dropped.items()}, columns=DROPPED_COLUMNS)

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(self._summary, columns=SUMMARY_COLUMNS)

    def by_segment(self) -> pd.DataFrame:
        rows = []
        for (label, agent, kind), acc in self._segments.items():
            rows.append({"handoff": label, "agent": agent, "kind": kind, "candidates": acc.candidates,
                         "dropped": acc.dropped,
                         "share_dropped": acc.dropped / acc.candidates if acc.candidates else np.nan,
                         "mean_value_dropped": acc.dropped_total / acc.dropped_finite if acc.dropped_finite else np.nan,
                         "mean_value_kept": acc.kept_total / acc.kept_finite if acc.kept_finite else np.nan})
        return pd.DataFrame(rows, columns=SEGMENT_COLUMNS)


def _finite_min(values) -> float:
    values = np.asarray(values)[np.isfinite(values)]
    return float(values.min()) if len(values) else float("nan")


def _finite_max(values) -> float:
    values = np.asarray(values)[np.isfinite(values)]
    return float(values.max()) if len(values) else float("nan")


@dataclass
class KnnTables:
    """The report's tables (and its settings, for the JSON)."""

    settings: KnnSettings
    filtered: str
    layer: int
    scores_match: bool
    dropped: pd.DataFrame
    summary: pd.DataFrame
    by_segment: pd.DataFrame


def knn_figure(tables: KnnTables):
    """Seaborn: share of each segment's candidates dropped (left); kNN-layer scores of kept vs dropped (right)."""
    import seaborn as sns

    from render.figures import new_figure

    fig = new_figure(11.0, 4.2)
    left, right = fig.subplots(1, 2)
    segs = tables.by_segment.assign(segment=lambda t: t["agent"] + " " + t["kind"])
    if len(segs):
        sns.barplot(data=segs, x="share_dropped", y="segment", hue="handoff", ax=left, orient="h")
        left.legend(fontsize=6, title=None)
    left.set_xlabel("share of candidates dropped")
    left.set_ylabel("")
    left.tick_params(axis="y", labelsize=7)
    dropped = tables.dropped
    if len(dropped):
        sns.histplot(data=dropped, x="value", hue="handoff", ax=right, element="step", stat="count", bins=40)
    right.set_xlabel(f"score at the kNN layer {tables.layer} (unfiltered capture)")
    right.set_title("dropped columns", fontsize=8)
    summary = tables.summary
    checked = summary["kept_are_top"].dropna()
    exact = summary.loc[summary["exact_scores"].astype(bool), "kept_are_top"].dropna()
    verdict = (f"kept were the best-scoring in {int(checked.sum())} of {len(checked)} hand-offs "
               f"({int(exact.sum())} of {len(exact)} where the scores are exact)"
               if len(checked) else "no ranking check (strategy random or nothing dropped)")
    fig.suptitle(f"kNN filtering ({tables.settings.strategy}, keep {tables.settings.percentage:g}, "
                 f"min_keep {tables.settings.min_keep}, score {tables.settings.score}) · {verdict}", fontsize=9)
    fig.tight_layout()
    return fig
