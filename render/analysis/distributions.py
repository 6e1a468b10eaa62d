"""Per-layer distribution of a hand-off's values over all problems.

Exact summaries come from a fixed-bin histogram per (hand-off label, layer) filled while the
capture streams by (mean, std, min and max are exact; quantiles are read off the histogram, to
within one bin). The figures are seaborn violins of a sample: at most `SAMPLE_COLUMNS` random
columns of every hand-off, all layers of each (seeded, so a rerun draws the same).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BINS = 400
SAMPLE_COLUMNS = 16
VIOLIN_VALUES = 2000  # per layer at most, drawn evenly from the sample (a KDE of more only costs time)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DISTRIBUTION_COLUMNS = ["handoff", "layer", "n_values", "mean", "std", "min", "max", "q05", "q25", "median", "q75",
                        "q95", "below_range", "above_range"]


def value_range(mode) -> tuple[float, float]:
    """The histogram's range: the similarity mode's own (a `ModeScale`, or a built-in mode's name)."""
    from render.colormaps import as_mode_scale

    scale = as_mode_scale(mode)
    return (scale.low, scale.high)


class _Layers:
    def __init__(self, num_layers: int):
        self.counts = np.zeros((num_layers, BINS), dtype=np.int64)
        self.total = np.zeros(num_layers)
        self.squares = np.zeros(num_layers)
        self.low = np.full(num_layers, np.inf)
        self.high = np.full(num_layers, -np.inf)
        self.below = np.zeros(num_layers, dtype=np.int64)
        self.above = np.zeros(num_layers, dtype=np.int64)
        self.samples: list[np.ndarray] = []  # [num_layers, <= SAMPLE_COLUMNS] each


class LayerDistributions:
    """Accumulates `add(label, values, finite)`; `table()` summarises, `figure(label)` draws the violins."""

    def __init__(self, num_layers: int, mode: str = "seed", seed: int = 0):
        self.num_layers = num_layers
        self.mode = mode
        self.seed = seed
        self.lo, self.hi = value_range(mode)
        self._labels: dict[str, _Layers] = {}

    def add(self, label: str, values: np.ndarray, finite: np.ndarray, problem: int = 0, place: int = 0) -> None:
        """values: [num_layers, T] float32 (non-finite cells already 0); finite: [num_layers, T] bool.

        problem, place: the problem's number and the hand-off's index in it, which seed the sample's draw
        (so it is the same however the problems are split between workers)."""
        acc = self._labels.get(label)
        if acc is None:
            acc = self._labels[label] = _Layers(self.num_layers)
        num_layers, width = values.shape
        if width == 0:
            return
        scaled = (values - self.lo) * (BINS / (self.hi - self.lo))
        bins = np.clip(scaled, 0, BINS - 1).astype(np.int64)
        flat = (bins + np.arange(num_layers)[:, None] * BINS)[finite]
        acc.counts += np.bincount(flat, minlength=num_layers * BINS).reshape(num_layers, BINS)
        acc.below += (finite & (values < self.lo)).sum(axis=1)
        acc.above += (finite & (values > self.hi)).sum(axis=1)
        acc.total += values.sum(axis=1, dtype=np.float64)
        acc.squares += np.einsum("lt,lt->l", values, values, dtype=np.float64)
        acc.low = np.minimum(acc.low, np.where(finite, values, np.inf).min(axis=1))
        acc.high = np.maximum(acc.high, np.where(finite, values, -np.inf).max(axis=1))
        rng = np.random.default_rng((self.seed, problem, place))
        picked = rng.choice(width, size=min(width, SAMPLE_COLUMNS), replace=False)
        sample = np.where(finite[:, picked], values[:, picked], np.nan)
        acc.samples.append(sample.astype(np.float32))

    def merge(self, other: LayerDistributions) -> None:
        """Fold in what `other` accumulated (over later problems)."""
        for label, theirs in other._labels.items():
            mine = self._labels.get(label)
            if mine is None:
                self._labels[label] = theirs
                continue
            mine.counts += theirs.counts
            mine.total += theirs.total
            mine.squares += theirs.squares
            mine.low = np.minimum(mine.low, theirs.low)
            mine.high = np.maximum(mine.high, theirs.high)
            mine.below += theirs.below
            mine.above += theirs.above
            mine.samples += theirs.samples

    def histogram(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(counts [num_layers, BINS], bin edges [BINS + 1]) of one hand-off label."""
        return self._labels[label].counts, np.linspace(self.lo, self.hi, BINS + 1)

    def table(self) -> pd.DataFrame:
        rows = []
        edges = np.linspace(self.lo, self.hi, BINS + 1)
        for label, acc in self._labels.items():
            n = acc.counts.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = acc.total / n
                std = np.sqrt(np.maximum(acc.squares / n - mean ** 2, 0.0))
            cumulative = np.cumsum(acc.counts, axis=1)
            quantiles = {}
            for q in QUANTILES:
                # the upper edge of the first bin that reaches the q-th value
                target = np.ceil(q * n).clip(min=1)
                place = (cumulative < target[:, None]).sum(axis=1).clip(max=BINS - 1)
                quantiles[q] = np.where(n > 0, edges[place + 1], np.nan)
            for layer in range(self.num_layers):
                finite_range = n[layer] > 0
                rows.append({
                    "handoff": label, "layer": layer, "n_values": int(n[layer]), "mean": mean[layer],
                    "std": std[layer], "min": acc.low[layer] if finite_range else np.nan,
                    "max": acc.high[layer] if finite_range else np.nan,
                    "q05": quantiles[0.05][layer], "q25": quantiles[0.25][layer], "median": quantiles[0.5][layer],
                    "q75": quantiles[0.75][layer], "q95": quantiles[0.95][layer],
                    "below_range": int(acc.below[layer]), "above_range": int(acc.above[layer])})
        return pd.DataFrame(rows, columns=DISTRIBUTION_COLUMNS)

    def sample(self, label: str, most: int | None = None) -> pd.DataFrame:
        """The sampled values of one hand-off label as a long table (layer, value); with `most`, thinned
        evenly to at most that many values per layer."""
        acc = self._labels[label]
        if not acc.samples:
            return pd.DataFrame({"layer": pd.Series(dtype=int), "value": pd.Series(dtype=float)})
        block = np.concatenate(acc.samples, axis=1)  # [num_layers, sampled columns]
        if most is not None and block.shape[1] > most:
            block = block[:, np.linspace(0, block.shape[1] - 1, most).astype(np.int64)]
        layers = np.repeat(np.arange(self.num_layers), block.shape[1])
        values = block.reshape(-1)
        keep = np.isfinite(values)
        return pd.DataFrame({"layer": layers[keep], "value": values[keep]})

    def figure(self, label: str):
        """Seaborn violins (quartiles inside) of the sampled values at every layer of one hand-off label."""
        import seaborn as sns

        from render.figures import new_figure

        data = self.sample(label, VIOLIN_VALUES)
        width = min(20.0, max(6.0, 0.32 * self.num_layers + 1.5))
        fig = new_figure(width, 4.2)
        ax = fig.add_subplot()
        if len(data):
            sns.violinplot(data=data, x="layer", y="value", ax=ax, inner="quart", cut=0, density_norm="width",
                           linewidth=0.5, color="#7fa7d6")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{self.mode} value")
        ax.tick_params(axis="x", labelsize=7)
        n_handoffs = len(self._labels[label].samples)
        fig.suptitle(f"{label} · value distribution per layer · {n_handoffs} hand-offs "
                     f"(violins of ≤ {SAMPLE_COLUMNS} random columns each, ≤ {VIOLIN_VALUES} values per layer; "
                     "quartiles dashed)", fontsize=9)
        fig.tight_layout()
        return fig
