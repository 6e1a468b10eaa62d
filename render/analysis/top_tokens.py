"""The K highest and lowest columns of every hand-off at one layer (or at every layer), with their tokens.

Rows of `top_tokens.csv`: rank 1 is the highest value, 2 the next, ...; rank -1 the lowest,
-2 the next lowest, ... Ties keep column order. NaN cells are never ranked. With fewer than K
finite values a hand-off gives fewer rows, and a column may be both among the top and the
bottom ones when it has fewer than 2K.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from .segments import column_segments

TOP_COLUMNS = ["handoff", "problem", "layer", "rank", "column", "position", "token", "agent", "kind", "value"]
BY_TOKEN_COLUMNS = ["handoff", "side", "token", "count", "n_problems", "mean_value", "occurrences", "rate"]


def ranked_columns(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns of the k highest finite values, highest first; of the k lowest, lowest first) of a [T] row."""
    columns = np.flatnonzero(np.isfinite(row))
    if not len(columns):
        return columns, columns
    values = row[columns]
    descending = columns[np.argsort(-values, kind="stable")]
    ascending = columns[np.argsort(values, kind="stable")]
    return descending[:k], ascending[:k]


class TopTokens:
    """Accumulates `add(problem, label, handoff)` at `layers`; `table()` and `by_token()` are DataFrames."""

    def __init__(self, layers, k: int):
        if k < 1:
            raise ValueError(f"top K must be at least 1, got {k}")
        self.layers = list(layers)
        self.k = k
        self._rows: dict[str, list] = {c: [] for c in TOP_COLUMNS}
        self._occurrences: dict[str, Counter] = {}

    def add(self, problem: int, label: str, matrix: np.ndarray, handoff) -> None:
        """matrix: [num_layers, T] float32 (NaN where not finite)."""
        self._occurrences.setdefault(label, Counter()).update(handoff.tokens)
        if matrix.shape[1] == 0:
            return
        segments = column_segments(handoff)
        tokens = handoff.tokens
        for layer in self.layers:
            row = matrix[layer]
            top, bottom = ranked_columns(row, self.k)
            columns = np.concatenate([top, bottom])
            ranks = np.concatenate([np.arange(1, len(top) + 1), -np.arange(1, len(bottom) + 1)])
            places = segments.index[columns]
            rows = self._rows
            n = len(columns)
            rows["handoff"].extend([label] * n)
            rows["problem"].extend([problem] * n)
            rows["layer"].extend([layer] * n)
            rows["rank"].extend(ranks.tolist())
            rows["column"].extend(columns.tolist())
            rows["position"].extend(handoff.positions[columns].tolist())
            rows["token"].extend(tokens[c] for c in columns)
            rows["agent"].extend(segments.labels[p][0] for p in places)
            rows["kind"].extend(segments.labels[p][1] for p in places)
            rows["value"].extend(row[columns].tolist())

    def merge(self, other: TopTokens) -> None:
        """Fold in what `other` accumulated (over later problems)."""
        for column, values in other._rows.items():
            self._rows[column] += values
        for label, counts in other._occurrences.items():
            self._occurrences.setdefault(label, Counter()).update(counts)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows, columns=TOP_COLUMNS)

    def by_token(self, table: pd.DataFrame | None = None) -> pd.DataFrame:
        """Over problems, per hand-off label, side ('top'/'bottom') and token string: how often it is among
        the K (count, at every selected layer), in how many problems, its mean value there, how often the
        token occurs in those hand-offs at all (occurrences) and count / occurrences (rate; per layer)."""
        table = self.table() if table is None else table
        if not len(table):
            return pd.DataFrame(columns=BY_TOKEN_COLUMNS)
        table = table.assign(side=np.where(table["rank"] > 0, "top", "bottom"))
        grouped = table.groupby(["handoff", "side", "token"], sort=False).agg(
            count=("value", "size"), n_problems=("problem", "nunique"), mean_value=("value", "mean")).reset_index()
        grouped["occurrences"] = [self._occurrences[h][t] for h, t in zip(grouped["handoff"], grouped["token"])]
        grouped["rate"] = grouped["count"] / (grouped["occurrences"] * len(self.layers))
        grouped = grouped.sort_values(["handoff", "side", "count", "mean_value"],
                                      ascending=[True, False, False, False], kind="stable")
        bottom = grouped["side"] == "bottom"
        grouped = pd.concat([grouped[~bottom], grouped[bottom].sort_values(
            ["handoff", "count", "mean_value"], ascending=[True, False, True], kind="stable")])
        return grouped.reset_index(drop=True)[BY_TOKEN_COLUMNS]


def top_tokens_figure(by_token: pd.DataFrame, handoff: str, layer_text: str, show: int = 15):
    """Bars: the tokens most often among the top K (left) and bottom K (right) of one hand-off label."""
    import seaborn as sns

    from render.figures import new_figure
    from render.layout import format_token

    fig = new_figure(10.0, max(3.0, 0.22 * show + 1.2))
    axes = fig.subplots(1, 2)
    for ax, side, colour in zip(axes, ("top", "bottom"), ("#c0392b", "#2874a6")):
        part = by_token[(by_token["handoff"] == handoff) & (by_token["side"] == side)].head(show)
        labels = [f"“{format_token(t, 16)}”" for t in part["token"]]
        places = np.arange(len(part))  # one bar per row, even when two tokens print alike
        ax.barh(places, part["count"].to_numpy(), color=colour)
        ax.set_yticks(places, labels, parse_math=False)  # token text is text, never mathtext
        ax.invert_yaxis()
        for y, (count, mean) in enumerate(zip(part["count"], part["mean_value"])):
            ax.text(count, y, f" {mean:.2f}", va="center", fontsize=6)
        sns.despine(ax=ax)
        ax.set_title(f"most often in the {side} K (bar label: mean value)", fontsize=8)
        ax.set_xlabel("times among the K")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{handoff} · tokens by string · {layer_text}", fontsize=9)
    fig.tight_layout()
    return fig
