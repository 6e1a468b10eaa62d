"""`latentmas analyze` on the latent readout: per agent, the top-1 tokens, entropy by step and realign cosine.

Synthetic captures are written with `CaptureWriter` (readout_top_k 2); every number the analysis reports is
checked against a recomputation from the reader's `LatentReadout` arrays. One tiny-qwen3 capture checks the
whole path against `latentmas readout`'s own list of steps.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest
from test_analysis import run

from capture.format import CaptureReader, CaptureWriter, Handoff, LatentReadout, ProblemRecord, Segment
from render.analysis import analyze_capture, write_analysis
from render.analysis.readout import entropy_figure
from render.info import safe

AGENTS = ("planner", "critic", "refiner", "judger")
PROMPT = 4  # prompt columns per agent
HOSTILE = "$\\frac{1}{2}$<b>\x1b[2J\u202e\n"
VOCAB = ("A", " the", "7", "\t")


def _step_readouts(rng, numbers, agents, steps, k, realign):
    """{(problem, agent, step): (ids [k], tokens [k], probs [k], entropy, cosine, nearest)}; planner's step 0 is
    always the hostile token."""
    out = {}
    for n in numbers:
        for agent in agents:
            for step in range(steps):
                top = HOSTILE if (agent == "planner" and step == 0) else VOCAB[rng.integers(len(VOCAB))]
                tokens = [top] + [f"alt{j}" for j in range(1, k)]
                probs = np.sort(rng.dirichlet(np.ones(k + 1))[:k])[::-1].astype(np.float32)
                out[(n, agent, step)] = (np.arange(k) + 10 * step + 1, tokens, probs,
                                         np.float32(rng.uniform(0.5, 4.0)),
                                         np.float32(rng.uniform(0.2, 1.0)) if realign else np.float32(np.nan),
                                         top if realign else "")
    return out


def _handoff(index, number, readouts, steps, k, dropped=frozenset(), agents=AGENTS):
    """Hand-off agents[index] -> agents[index + 1]: per earlier agent PROMPT prompt columns, then its latent steps
    (those not in `dropped`, a set of (agent, step), as a kNN trim would); each latent column has its step's readout."""
    segments, tokens, kept = [], [], []
    for agent in agents[:index + 1]:
        start = len(tokens)
        segments.append(Segment(agent, "prompt", start, start + PROMPT))
        tokens += [f"p{start + i}" for i in range(PROMPT)]
        latent = [s for s in range(steps) if (agent, s) not in dropped]
        segments.append(Segment(agent, "latent", start + PROMPT, start + PROMPT + len(latent)))
        tokens += ["<latent>"] * len(latent)
        kept += [None] * PROMPT + [(agent, s) for s in latent]
    readout = LatentReadout.empty(len(tokens), k) if k else None
    for column, key in enumerate(kept):
        if key is None or readout is None:
            continue
        ids, texts, probs, entropy, cosine, nearest = readouts[(number, *key)]
        readout.step[column], readout.ids[column], readout.tokens[column] = key[1], ids, list(texts)
        readout.probs[column], readout.entropy[column] = probs, entropy
        readout.realign_cosine[column], readout.realign_token[column] = cosine, nearest
    matrix = np.linspace(-0.5, 0.5, 3 * len(tokens)).reshape(3, -1).astype(np.float32)
    return Handoff(agents[index], agents[index + 1], matrix, np.arange(len(tokens)), tokens, segments, readout)


def readout_capture(path, numbers=(1, 2, 3), steps=3, k=2, realign=True, seed=0, dropped=None, agents=AGENTS):
    """A float32 capture of three hand-offs per problem with a latent readout of `k` (0: none) for each step of
    the first three agents. dropped: problem -> (agent, step) pairs missing from its second and third hand-off."""
    rng = np.random.default_rng(seed)
    readouts = _step_readouts(rng, numbers, agents[:3], steps, max(k, 1), realign)
    records = []
    for n in numbers:
        gone = (dropped or {}).get(n, frozenset())
        handoffs = [_handoff(i, n, readouts, steps, k, frozenset() if i == 0 else gone, agents) for i in range(3)]
        records.append(ProblemRecord(n, f"question {n}", "1", "1", True, handoffs))
    attrs = {"model_name": "toy/model", "method": "latent_mas", "similarity": "seed", "num_layers": 3}
    with CaptureWriter.open(path, attrs, {"k": 1}, 3, dtype="float32", overwrite=True, readout_top_k=k) as writer:
        writer.append_batch(records)
        writer.finish("2025-01-01T00:00:00", {})
    return path


def recount(path):
    """From the reader's LatentReadout arrays, independently: {(problem, agent, step): (top-1 text, top-1 prob,
    entropy, cosine)} over every hand-off (a step kept in any of them counts, once)."""
    found = {}
    with CaptureReader(path) as reader:
        for number in reader.problem_numbers:
            for handoff in reader.handoffs(number):
                r = handoff.readout
                agent_of = {}
                for s in handoff.segments:
                    agent_of.update({c: s.agent for c in range(s.start, s.stop) if s.kind == "latent"})
                for column in np.flatnonzero(r.has):
                    key = (number, agent_of[int(column)], int(r.step[column]))
                    found.setdefault(key, (r.tokens[column][0], float(r.probs[column][0]), float(r.entropy[column]),
                                           float(r.realign_cosine[column])))
    return found


def test_tokens_and_shares_match_the_reader(tmp_path):
    path = readout_capture(tmp_path / "r.h5", numbers=(1, 2, 3, 4), dropped={2: {("planner", 2), ("critic", 0)}})
    result = analyze_capture(path, progress=False, show=0)
    found = recount(path)
    # planner step 2 of problem 2, trimmed after the first hand-off, counts (from it); critic step 0 of problem 2
    # is in no hand-off (the critic's latent steps first appear in the second one), so it does not
    assert len(found) == 4 * 3 * 3 - 1 and (2, "planner", 2) in found and (2, "critic", 0) not in found
    tokens = result.readout_tokens
    for agent in ("planner", "critic", "refiner"):
        mine = [v for (n, a, s), v in found.items() if a == agent]
        counts = Counter(t for t, *_ in mine)
        part = tokens[tokens["agent"] == agent]
        assert dict(zip(part["token"], part["count"])) == dict(counts)
        assert part["count"].is_monotonic_decreasing and part["rank"].tolist() == list(range(1, len(part) + 1))
        for row in part.itertuples():
            assert row.share == pytest.approx(counts[row.token] / len(mine), abs=1e-12)
            assert row.mean_prob == pytest.approx(np.mean([p for t, p, *_ in mine if t == row.token]), rel=1e-6)
            assert row.n_problems == len({n for (n, a, s), (t, *_) in found.items() if a == agent and t == row.token})
        assert part["share"].sum() == pytest.approx(1.0)
    planner = tokens[(tokens["agent"] == "planner") & (tokens["token"] == HOSTILE)]
    assert planner["count"].tolist() == [4] and planner["share"].tolist() == [pytest.approx(1 / 3)]
    agents = result.readout_agents
    assert agents["agent"].tolist() == ["planner", "critic", "refiner"]  # run order; the judger has no latent steps
    assert agents["latent_steps"].tolist() == [12, 11, 12] and agents["steps"].tolist() == [3, 3, 3]
    for row in agents.itertuples():
        mine = [v for (n, a, s), v in found.items() if a == row.agent]
        assert row.mean_realign_cosine == pytest.approx(np.mean([c for *_, c in mine]), rel=1e-6)
        assert row.realigned_steps == row.latent_steps == len(mine)
        assert row.mean_entropy == pytest.approx(np.mean([e for _, _, e, _ in mine]), rel=1e-6)


def test_entropy_by_step_matches_numpy(tmp_path):
    path = readout_capture(tmp_path / "r.h5", numbers=tuple(range(1, 8)), steps=4)
    result = analyze_capture(path, progress=False, show=0)
    by_step = defaultdict(list)
    for (_n, agent, step), (_, _, entropy, _) in recount(path).items():
        by_step[(agent, step)].append(entropy)
    table = result.readout_entropy
    assert list(zip(table["agent"], table["step"])) == [(a, s) for a in ("planner", "critic", "refiner")
                                                        for s in range(4)]
    for row in table.itertuples():
        values = np.array(by_step[(row.agent, row.step)])
        q25, median, q75 = np.percentile(values, [25, 50, 75])
        assert row.n == 7
        assert (row.mean, row.std, row.median, row.min, row.max) == pytest.approx(
            (values.mean(), values.std(), median, values.min(), values.max()), rel=1e-9)
        assert (row.q25, row.q75, row.iqr) == pytest.approx((q25, q75, q75 - q25), rel=1e-9)


def test_readout_files_report_and_figure(tmp_path):
    path = readout_capture(tmp_path / "r.h5")
    result = run("analyze", path, "--out", tmp_path / "out", "--no-progress", "--show", "0")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    tokens = pd.read_csv(out / "readout_tokens.csv", keep_default_na=False)
    assert list(tokens.columns) == ["agent", "rank", "token", "count", "share", "mean_prob", "n_problems"]
    assert HOSTILE in tokens["token"].tolist() and "\t" in tokens["token"].tolist()  # text kept exactly
    entropy = pd.read_csv(out / "readout_entropy.csv")
    assert {"agent", "step", "n", "mean", "median", "q25", "q75", "iqr", "mean_realign_cosine"} <= set(entropy)
    assert pd.read_csv(out / "readout_agents.csv")["latent_steps"].tolist() == [9, 9, 9]
    assert (out / "readout_entropy.png").stat().st_size > 0
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["readout"]["top_k"] == 2 and len(summary["readout"]["entropy_by_step"]) == 9
    # the terminal section: one line per agent, the hostile token escaped, never raw
    lines = result.output.splitlines()
    section = lines[lines.index(next(x for x in lines if x.startswith("Latent readout"))) + 1:]
    assert [x.split(":")[0].strip() for x in section] == ["planner", "critic", "refiner"]
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert '"$\\frac{1}{2}$<b>\\x1b[2J…" 33%' in section[0] and "realign cosine" in section[0]


def test_without_realignment_there_is_no_cosine(tmp_path):
    path = readout_capture(tmp_path / "r.h5", realign=False)
    result = analyze_capture(path, progress=False, show=0)
    assert result.readout_agents["realigned_steps"].tolist() == [0, 0, 0]
    assert result.readout_agents["mean_realign_cosine"].isna().all()
    assert result.readout_entropy["mean_realign_cosine"].isna().all()
    assert not any("realign" in line for line in result.readout_lines())


@pytest.mark.parametrize("k", [0, 2])
def test_no_readout_is_skipped_with_a_note(tmp_path, k):
    """k 0: the capture keeps no readout (as schema 1 files); k 2: it keeps one, but no hand-off holds a latent
    step. Either way: one line in the report, a note, no readout files, no warning."""
    path = readout_capture(tmp_path / "r.h5", k=k, steps=0 if k else 3)
    result = analyze_capture(path, progress=False, show=0)
    assert not result.has_readout and result.readout_top_k == k
    why = "has no latent readout" if k == 0 else "no analysed hand-off holds a latent step"
    assert len(result.readout_lines()) == 1 and why in result.readout_lines()[0]
    assert any(why in note for note in result.notes)
    assert result.num_figures == 3 * 3  # profile, distributions, top tokens per hand-off; no readout figure
    folder, written = write_analysis(result, tmp_path / "out", progress=False, figures=k == 0)
    assert not any(p.name.startswith("readout") for p in written) and not list(folder.glob("readout*"))
    summary = json.loads((folder / "analysis.json").read_text())
    assert (summary["readout"] is None) == (k == 0)
    cli = run("analyze", path, "--out", tmp_path / "cli", "--no-progress", "--no-figures")
    assert cli.exit_code == 0 and why in cli.output
    assert not any(line.startswith("warning") for line in cli.output.splitlines())


def test_transitions_limit_the_steps_counted(tmp_path):
    path = readout_capture(tmp_path / "r.h5")
    result = analyze_capture(path, progress=False, show=0, transitions="planner_to_critic")
    assert result.readout_agents["agent"].tolist() == ["planner"]
    assert result.readout_agents["latent_steps"].tolist() == [9]


def test_jobs_do_not_change_the_readout(tmp_path):
    path = readout_capture(tmp_path / "r.h5", numbers=tuple(range(1, 41)), steps=2)
    one = analyze_capture(path, progress=False, show=0, jobs=1)
    two = analyze_capture(path, progress=False, show=0, jobs=2)
    for name in ("readout_steps", "readout_agents", "readout_tokens", "readout_entropy"):
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name), check_exact=True)
    assert one.readout_agents["n_problems"].tolist() == [40, 40, 40]


def test_agent_names_in_the_figure_are_text(tmp_path):
    agents = ("$x^2$", "<i>critic</i>", "re\x1bfiner", "judger")
    path = readout_capture(tmp_path / "r.h5", agents=agents)
    result = analyze_capture(path, progress=False, show=0)
    figure = entropy_figure(result.readout_entropy)  # what figures() yields as readout_entropy.png
    figure.canvas.draw()
    legend = figure.axes[0].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [safe(a) for a in agents[:3]] and texts[2] == "re\\x1bfiner" and not any(t.get_parse_math() for t in legend.get_texts())
    assert "\x1b" not in "\n".join(result.readout_lines())


def test_tiny_qwen3_readout_matches_latentmas_readout(tiny_lm, fake_problems, tmp_path):
    from captures import solve_and_capture, tiny_config

    from render.readout import latent_steps

    cfg = tiny_config(latent_space_realign=True, readout_top_k=3, max_new_tokens=2)
    path = tmp_path / "tiny.h5"
    solve_and_capture(tiny_lm, fake_problems()[:2], cfg, path, batch_size=2)
    result = analyze_capture(path, progress=False, show=0)
    with CaptureReader(path) as reader:
        steps = [s for n in reader.problem_numbers for s in latent_steps(reader, n)]
    agents = result.readout_agents
    assert agents["agent"].tolist() == ["planner", "critic", "refiner"]
    assert agents["latent_steps"].tolist() == [2 * cfg.latent_steps] * 3 and agents["realigned_steps"].min() > 0
    for agent in agents["agent"]:
        want = Counter(s.tokens[0] for s in steps if s.agent == agent)
        part = result.readout_tokens[result.readout_tokens["agent"] == agent]
        assert dict(zip(part["token"], part["count"])) == dict(want)
    table = result.readout_entropy
    for row in table.itertuples():
        values = [s.entropy for s in steps if s.agent == row.agent and s.step == row.step]
        assert row.n == 2 and row.median == pytest.approx(np.median(values), rel=1e-6)


def test_analysis_json_keeps_tokens_of_every_agent(tmp_path, monkeypatch):
    """The JSON's readout tokens are capped per agent, so the first agent's cannot crowd out the others'."""
    from render.analysis import analyze

    monkeypatch.setattr(analyze, "JSON_TOKENS", 1)
    result = analyze_capture(readout_capture(tmp_path / "r.h5"), progress=False, show=0)
    tokens = result.summary()["readout"]["tokens"]
    assert [row["agent"] for row in tokens] == ["planner", "critic", "refiner"]
