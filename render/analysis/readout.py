"""The latent readout over problems: what each agent's latent steps would say next, and how sure it is.

A latent step's readout (`capture.format.LatentReadout`, kept when the capture ran with
`--readout_top_k` > 0) is the model's own next-token distribution at that step: top-k tokens with
probabilities, the entropy, and with `--latent_space_realign` the cosine of the realigned input and
its nearest input embedding. Each agent's steps appear in every later hand-off with the same
readout; a step counts once per problem, from the first analysed hand-off that holds it (as in
`latentmas readout`), so with `--transitions` only the steps in the chosen hand-offs count.

Tables (pandas, one row each):
    readout_agents.csv     per agent: latent steps, problems, entropy, top-1 probability, realign cosine
    readout_tokens.csv     per agent and top-1 token text: count, share of the agent's steps, mean top-1 prob
    readout_entropy.csv    per agent and step index: entropy mean, std, quartiles (numpy's linear rule), ...
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from render.figures import LITERAL

STEP_COLUMNS = ["problem", "agent", "step", "token", "token_id", "prob", "entropy", "realign_cosine"]
AGENT_COLUMNS = ["agent", "latent_steps", "n_problems", "steps", "distinct_top1", "mean_entropy", "median_entropy",
                 "mean_top1_prob", "realigned_steps", "mean_realign_cosine"]
TOKEN_COLUMNS = ["agent", "rank", "token", "count", "share", "mean_prob", "n_problems"]
ENTROPY_COLUMNS = ["agent", "step", "n", "mean", "std", "min", "q25", "median", "q75", "iqr", "max",
                   "mean_top1_prob", "mean_realign_cosine"]


class ReadoutSteps:
    """Accumulates `add(problem, handoff)`: one row per (problem, agent, latent step) with a readout.

    Rows: problem, agent, step, the top-1 token's text, id and probability, the step's entropy (nats)
    and realign cosine (NaN without realignment). `merge` appends a later chunk of problems.
    """

    def __init__(self):
        self._rows: dict[str, list] = {c: [] for c in STEP_COLUMNS}
        self._seen: set[tuple[int, str, int]] = set()

    def add(self, problem: int, handoff) -> None:
        """Fold in the latent columns of `handoff` that have a readout and were not seen in this problem yet."""
        readout = handoff.readout
        if readout is None or not readout.top_k:
            return
        has = readout.has
        rows = self._rows
        for segment in sorted(handoff.segments, key=lambda s: s.start):
            if segment.kind != "latent":
                continue
            for column in range(max(0, segment.start), min(len(has), segment.stop)):
                if not has[column]:
                    continue
                key = (problem, segment.agent, int(readout.step[column]))
                if key in self._seen:
                    continue
                self._seen.add(key)
                rows["problem"].append(problem)
                rows["agent"].append(segment.agent)
                rows["step"].append(key[2])
                rows["token"].append(readout.tokens[column][0])
                rows["token_id"].append(int(readout.ids[column, 0]))
                rows["prob"].append(float(readout.probs[column, 0]))
                rows["entropy"].append(float(readout.entropy[column]))
                rows["realign_cosine"].append(float(readout.realign_cosine[column]))

    def merge(self, other: ReadoutSteps) -> None:
        for column, values in other._rows.items():
            self._rows[column] += values
        self._seen |= other._seen

    def __len__(self) -> int:
        return len(self._rows["problem"])

    def table(self) -> pd.DataFrame:
        """Every counted step, in the order read (problems, then hand-offs, then columns)."""
        table = pd.DataFrame(self._rows, columns=STEP_COLUMNS)
        return table.astype({"problem": np.int64, "step": np.int64, "token_id": np.int64, "prob": np.float64,
                             "entropy": np.float64, "realign_cosine": np.float64})


def agents_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per agent (in the order they first appear): latent_steps counted, n_problems, steps (distinct step
    indices), distinct_top1 (distinct top-1 token texts), mean/median entropy, mean_top1_prob,
    realigned_steps (steps with a realign cosine) and mean_realign_cosine (NaN when none)."""
    if not len(steps):
        return pd.DataFrame(columns=AGENT_COLUMNS)
    grouped = steps.groupby("agent", sort=False).agg(
        latent_steps=("step", "size"), n_problems=("problem", "nunique"), steps=("step", "nunique"),
        distinct_top1=("token", "nunique"), mean_entropy=("entropy", "mean"), median_entropy=("entropy", "median"),
        mean_top1_prob=("prob", "mean"), realigned_steps=("realign_cosine", "count"),
        mean_realign_cosine=("realign_cosine", "mean"))
    return grouped.reset_index()[AGENT_COLUMNS]


def tokens_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per agent and top-1 token text: count (steps whose most likely token it is), share of the agent's
    counted steps, mean_prob (its mean probability when top-1), n_problems; rank 1 = most frequent, ties in
    the order first read."""
    if not len(steps):
        return pd.DataFrame(columns=TOKEN_COLUMNS)
    totals = steps.groupby("agent", sort=False).size()
    grouped = steps.groupby(["agent", "token"], sort=False).agg(
        count=("prob", "size"), mean_prob=("prob", "mean"), n_problems=("problem", "nunique")).reset_index()
    grouped["share"] = grouped["count"] / grouped["agent"].map(totals)
    order = {agent: i for i, agent in enumerate(totals.index)}
    grouped = grouped.assign(_agent=grouped["agent"].map(order), _first=np.arange(len(grouped)))
    grouped = grouped.sort_values(["_agent", "count", "_first"], ascending=[True, False, True], kind="stable")
    grouped["rank"] = grouped.groupby("agent", sort=False).cumcount() + 1
    return grouped.reset_index(drop=True)[TOKEN_COLUMNS]


def entropy_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per agent and step index (0 .. latent_steps - 1) over problems: n, mean, std (population), min,
    q25, median, q75 (numpy's linear interpolation), iqr = q75 - q25, max of the entropy (nats), and the
    step's mean top-1 probability and mean realign cosine (NaN without realignment). NaN entropies are left out."""
    if not len(steps):
        return pd.DataFrame(columns=ENTROPY_COLUMNS)
    rows = []
    for (agent, step), part in steps.groupby(["agent", "step"], sort=False):
        values = part["entropy"].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0]) if len(values) else np.full(5, np.nan)
        cosine = part["realign_cosine"].to_numpy(dtype=np.float64)
        cosine = cosine[np.isfinite(cosine)]
        rows.append({"agent": agent, "step": int(step), "n": len(values),
                     "mean": values.mean() if len(values) else np.nan,
                     "std": values.std() if len(values) else np.nan,
                     "min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "iqr": q[3] - q[1], "max": q[4],
                     "mean_top1_prob": float(part["prob"].mean()),
                     "mean_realign_cosine": cosine.mean() if len(cosine) else np.nan})
    order = {agent: i for i, agent in enumerate(dict.fromkeys(steps["agent"]))}
    table = pd.DataFrame(rows, columns=ENTROPY_COLUMNS)
    table = table.assign(_agent=table["agent"].map(order)).sort_values(["_agent", "step"], kind="stable")
    return table.drop(columns="_agent").reset_index(drop=True)


def terminal_token(text: str, width: int = 24) -> str:
    """A token for a terminal line: always quoted, every unprintable character (controls, line breaks, bidi
    and other format characters) escaped as `\\n` / `\\x1b` / `\\u202e`, cut to `width` characters."""
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    if len(shown) > width:
        shown = shown[: width - 1] + "…"
    return f'"{shown}"'


def summary_lines(agents: pd.DataFrame, tokens: pd.DataFrame, entropy: pd.DataFrame, show: int = 3) -> list[str]:
    """The report's readout section: one line per agent (its `show` most frequent top-1 tokens with share and
    mean probability, median entropy by step, mean realign cosine when there is one)."""
    from render.info import safe

    if not len(agents):
        return []
    lines = ["Latent readout (each latent step's most likely next token; entropy in nats):"]
    for row in agents.itertuples(index=False):
        part = tokens[tokens["agent"] == row.agent].head(show)
        top = ", ".join(f"{terminal_token(t.token)} {t.share:.0%} (p {t.mean_prob:.2g})"
                        for t in part.itertuples(index=False))
        medians = entropy.loc[entropy["agent"] == row.agent, "median"]
        line = (f"  {safe(row.agent, 24)}: {row.latent_steps} steps in {row.n_problems} problem"
                f"{'s' if row.n_problems != 1 else ''}; top-1 {top}; median entropy by step "
                + " → ".join(f"{m:.2f}" for m in medians))
        if row.realigned_steps:
            line += f"; realign cosine {row.mean_realign_cosine:.3f}"
        lines.append(line)
    return lines


def entropy_figure(entropy: pd.DataFrame):
    """Entropy by latent step, one line per agent: the median with its interquartile range shaded, the mean
    dashed (x: step index)."""
    import seaborn as sns

    from render.figures import agent_color, new_figure
    from render.info import safe

    fig = new_figure(6.0, 3.4)
    ax = fig.subplots()
    for agent, part in entropy.groupby("agent", sort=False):
        colour = agent_color(agent)
        steps = part["step"].to_numpy()
        ax.fill_between(steps, part["q25"].to_numpy(), part["q75"].to_numpy(), color=colour, alpha=0.2, linewidth=0)
        ax.plot(steps, part["median"].to_numpy(), color=colour, marker="o", markersize=3,
                label=safe(agent, 30))
        ax.plot(steps, part["mean"].to_numpy(), color=colour, linestyle="--", linewidth=0.8)
    steps = sorted(entropy["step"].unique().tolist())
    ax.set_xticks(steps)
    ax.set_xlabel("latent step")
    ax.set_ylabel("entropy (nats)")
    sns.despine(ax=ax)
    legend = ax.legend(fontsize=7, frameon=False, title="median, IQR shaded, mean dashed", title_fontsize=7)
    for text in legend.get_texts():
        text.set(**LITERAL)
    ax.set_title("latent readout: entropy of each latent step's next-token distribution", fontsize=8)
    fig.tight_layout()
    return fig
