"""Layer x segment profile: how high each segment's values are at each layer, per problem and over problems.

For every hand-off label, segment (agent, kind) and layer it keeps the count, sum and sum of
squares of the finite values (pooled over problems), and each problem's own mean, so the
aggregate carries a 95 % confidence interval over problems (Student t on the per-problem means).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from render.figures import LITERAL

from .segments import column_segments

PER_PROBLEM_COLUMNS = ["handoff", "problem", "layer", "agent", "kind", "mean", "std", "n_values"]
PROFILE_COLUMNS = ["handoff", "layer", "agent", "kind", "mean", "std", "n_values", "n_problems", "problem_mean",
                   "ci_low", "ci_high"]


class _Key:
    """Pooled sums [num_layers] and per-problem means of one (hand-off label, agent, kind)."""

    def __init__(self, num_layers: int):
        self.count = np.zeros(num_layers)
        self.total = np.zeros(num_layers)
        self.squares = np.zeros(num_layers)
        self.problem_means: list[np.ndarray] = []


class LayerSegmentProfile:
    """Accumulates `add(problem, label, handoff)`; `table()` and `per_problem()` are pandas DataFrames."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._keys: dict[tuple[str, str, str], _Key] = {}
        self._rows: dict[str, list] = {c: [] for c in PER_PROBLEM_COLUMNS}

    def add(self, problem: int, label: str, values: np.ndarray, finite: np.ndarray, handoff) -> None:
        """values: [num_layers, T] float32 with non-finite cells set to 0; finite: [num_layers, T] bool."""
        segments = column_segments(handoff)
        layers = np.arange(self.num_layers)
        for place, (agent, kind) in enumerate(segments.labels):
            columns = segments.index == place
            block, ok = values[:, columns], finite[:, columns]
            count = ok.sum(axis=1).astype(np.float64)
            total = block.sum(axis=1, dtype=np.float64)
            squares = np.einsum("lt,lt->l", block, block, dtype=np.float64)
            key = self._keys.get((label, agent, kind))
            if key is None:
                key = self._keys[(label, agent, kind)] = _Key(self.num_layers)
            key.count += count
            key.total += total
            key.squares += squares
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = total / count
                std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
            key.problem_means.append(mean)
            rows = self._rows
            rows["handoff"].append(np.full(self.num_layers, label, dtype=object))
            rows["problem"].append(np.full(self.num_layers, problem))
            rows["layer"].append(layers)
            rows["agent"].append(np.full(self.num_layers, agent, dtype=object))
            rows["kind"].append(np.full(self.num_layers, kind, dtype=object))
            rows["mean"].append(mean)
            rows["std"].append(std)
            rows["n_values"].append(count.astype(np.int64))

    def merge(self, other: LayerSegmentProfile) -> None:
        """Fold in what `other` accumulated (over later problems)."""
        for name, key in other._keys.items():
            mine = self._keys.get(name)
            if mine is None:
                self._keys[name] = key
                continue
            mine.count += key.count
            mine.total += key.total
            mine.squares += key.squares
            mine.problem_means += key.problem_means
        for column, parts in other._rows.items():
            self._rows[column] += parts

    def per_problem(self) -> pd.DataFrame:
        """One row per (hand-off, problem, layer, segment): mean, std and count of its finite values."""
        if not self._rows["layer"]:
            return pd.DataFrame(columns=PER_PROBLEM_COLUMNS)
        return pd.DataFrame({c: np.concatenate(v) for c, v in self._rows.items()})

    def table(self) -> pd.DataFrame:
        """One row per (hand-off, layer, segment) over problems.

        mean, std, n_values: of all finite values pooled; n_problems: problems with any value there;
        problem_mean, ci_low, ci_high: mean of the per-problem means and its 95 % t interval
        (NaN with fewer than two problems).
        """
        from scipy.special import stdtrit

        parts = []
        for (label, agent, kind), key in self._keys.items():
            means = np.vstack(key.problem_means)  # [problems, num_layers]
            present = np.isfinite(means)
            n_problems = present.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                pooled = key.total / key.count
                pooled_std = np.sqrt(np.maximum(key.squares / key.count - pooled ** 2, 0.0))
                problem_mean = np.where(n_problems > 0, np.nansum(means, axis=0) / n_problems, np.nan)
                spread = np.sqrt(np.nansum((means - problem_mean) ** 2, axis=0) / (n_problems - 1))
                half = stdtrit(np.maximum(n_problems - 1, 1), 0.975) * spread / np.sqrt(n_problems)
            half = np.where(n_problems > 1, half, np.nan)
            parts.append(pd.DataFrame({
                "handoff": label, "layer": np.arange(self.num_layers), "agent": agent, "kind": kind,
                "mean": pooled, "std": pooled_std, "n_values": key.count.astype(np.int64), "n_problems": n_problems,
                "problem_mean": problem_mean, "ci_low": problem_mean - half, "ci_high": problem_mean + half}))
        if not parts:
            return pd.DataFrame(columns=PROFILE_COLUMNS)
        return pd.concat(parts, ignore_index=True)[PROFILE_COLUMNS]


def segment_label(agent: str, kind: str) -> str:
    return f"{agent} {kind}"


def profile_figure(table: pd.DataFrame, handoff: str, band_layers: dict | None = None, mode: str = "seed"):
    """Layers x segments heatmap of the mean (left) and per-segment mean with its 95 % CI by layer (right).

    table: `LayerSegmentProfile.table()`; band_layers: layer -> 'high'/'low' for layers that were a
    horizontal band in at least half of the problems (marked on both panels).
    """
    import seaborn as sns

    from render.figures import new_figure

    rows = table[table["handoff"] == handoff]
    order = list(dict.fromkeys(segment_label(a, k) for a, k in zip(rows["agent"], rows["kind"])))
    rows = rows.assign(segment=[segment_label(a, k) for a, k in zip(rows["agent"], rows["kind"])])
    grid = rows.pivot(index="layer", columns="segment", values="mean")[order].sort_index(ascending=False)
    num_layers = len(grid)
    fig = new_figure(6.0 + 0.9 * len(order), max(4.0, 0.16 * num_layers + 1.8))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1.0, 0.5 * len(order)), 2.0]})
    sns.heatmap(grid, ax=left, cmap="viridis", cbar_kws={"label": f"mean {mode} value"},
                annot=num_layers <= 12 and len(order) <= 8, fmt=".2f", annot_kws={"fontsize": 6})
    left.set_xlabel("segment")
    left.set_ylabel("layer")
    left.tick_params(axis="x", labelrotation=35, labelsize=7)
    left.tick_params(axis="y", labelsize=6)
    for label in left.get_xticklabels():
        label.set_horizontalalignment("right")
    palette = sns.color_palette("tab10", len(order))
    for colour, name in zip(palette, order):
        part = rows[rows["segment"] == name].sort_values("layer")
        right.plot(part["layer"], part["problem_mean"], color=colour, label=name, linewidth=1.2)
        right.fill_between(part["layer"], part["ci_low"], part["ci_high"], color=colour, alpha=0.2, linewidth=0)
    for layer, sign in (band_layers or {}).items():
        right.axvspan(layer - 0.5, layer + 0.5, color="red" if sign == "high" else "blue", alpha=0.08)
        row = num_layers - 1 - layer  # the heatmap draws the last layer at the top
        left.annotate("◀", xy=(len(order), row + 0.5), xytext=(len(order) + 0.05, row + 0.5), fontsize=7,
                      va="center", annotation_clip=False, color="red" if sign == "high" else "blue")
    right.set_xlabel("layer")
    right.set_ylabel("mean over problems (95 % CI)")
    right.legend(fontsize=7, loc="best")
    n_problems = int(rows["n_problems"].max()) if len(rows) else 0
    marked = " · shaded layers: horizontal band in ≥ half the problems" if band_layers else ""
    fig.suptitle(f"{handoff} · layer × segment profile · {n_problems} problems{marked}", fontsize=9, **LITERAL)
    fig.tight_layout()
    return fig
