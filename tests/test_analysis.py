"""`latentmas analyze` and `render.analysis`: planted structure in synthetic captures comes out as planted.

Synthetic captures are written with `capture.format.CaptureWriter` (float32, so planted values are exact).
The tiny-qwen3 end-to-end runs are in test_compare.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from capture.format import CaptureWriter, Handoff, ProblemRecord, Segment
from latentmas.app.cli import main
from render.analysis import BandRule, analyze_capture, find_bands, write_analysis
from render.analysis.distributions import BINS
from render.analysis.scales import normalise

AGENTS = ("planner", "critic", "refiner", "judger")


# -- synthetic captures (also used by test_compare.py) -------------------------------------------------

def agent_handoff(index: int, matrix: np.ndarray, positions=None, tokens=None, segments=None) -> Handoff:
    """Hand-off AGENTS[index] -> AGENTS[index + 1] of a [L, T] matrix; by default one prompt and one latent
    segment per earlier agent, split evenly, tokens 'p<position>' for prompts and '<latent>' for latents."""
    width = matrix.shape[1]
    positions = np.arange(width, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
    if segments is None:
        segments, edges = [], np.linspace(0, width, 2 * (index + 1) + 1).astype(int)
        for agent in range(index + 1):
            segments += [Segment(AGENTS[agent], "prompt", int(edges[2 * agent]), int(edges[2 * agent + 1])),
                         Segment(AGENTS[agent], "latent", int(edges[2 * agent + 1]), int(edges[2 * agent + 2]))]
    if tokens is None:
        latent = np.zeros(width, dtype=bool)
        for s in segments:
            latent[s.start:s.stop] = s.kind == "latent"
        tokens = ["<latent>" if latent[c] else f"p{positions[c]}" for c in range(width)]
    return Handoff(AGENTS[index], AGENTS[index + 1], np.asarray(matrix, dtype=np.float32), positions, list(tokens),
                   list(segments))


def write(path: Path, problems: dict, num_layers: int, attrs: dict | None = None, finish: bool = True,
          questions: dict | None = None) -> Path:
    """problems: number -> list of Handoff. Writes a float32 capture of them (64 per commit)."""
    run_attrs = {"model_name": "toy/model", "method": "latent_mas", "similarity": "seed", "num_layers": num_layers,
                 "knn_filter": False, **(attrs or {})}
    records = [ProblemRecord(n, (questions or {}).get(n, f"question {n}"), "1", "1", True, h)
               for n, h in problems.items()]
    with CaptureWriter.open(path, run_attrs, {"k": 1}, num_layers, dtype="float32", overwrite=True) as writer:
        for start in range(0, len(records), 64):
            writer.append_batch(records[start:start + 64])
        if finish:
            writer.finish("2025-01-01T00:00:00", {})
    return path


def noise_capture(path: Path, numbers=(1, 2, 3), num_layers=6, widths=(10, 16, 22), seed=0, **kwargs) -> Path:
    rng = np.random.default_rng(seed)
    problems = {n: [agent_handoff(i, rng.uniform(-1, 1, (num_layers, w))) for i, w in enumerate(widths)]
                for n in numbers}
    return write(path, problems, num_layers, **kwargs)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def one_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def planted_matrix(rng, num_layers=36, width=600, noise=0.05):
    """Gaussian noise + a high horizontal band (layers 10-12, +0.5) + a vertical band (columns 300-309, +0.4)."""
    matrix = rng.normal(0.0, noise, (num_layers, width))
    matrix[10:13] += 0.5
    matrix[:, 300:310] += 0.4
    return matrix


# -- bands and hotspots ---------------------------------------------------------------------------------

def test_planted_bands_are_found_and_nothing_else():
    for seed in range(5):
        bands = find_bands(planted_matrix(np.random.default_rng(seed)))
        assert [(b.type, b.sign, b.layer_first, b.layer_last, b.column_first, b.column_last) for b in bands] == [
            ("horizontal", "high", 10, 12, 0, 599), ("vertical", "high", 0, 35, 300, 309)], seed


def test_low_band_and_a_hotspot_are_found():
    rng = np.random.default_rng(7)
    matrix = rng.normal(0.0, 0.05, (36, 400))
    matrix[30] -= 0.6
    matrix[20:22, 100:102] += 0.8  # a 2 x 2 blob: one hotspot, peak at the highest cell
    matrix[21, 101] += 0.4
    bands = find_bands(matrix)
    assert [(b.type, b.sign, b.layer_first, b.layer_last) for b in bands if b.type == "horizontal"] == [
        ("horizontal", "low", 30, 30)]
    hot = [b for b in bands if b.type == "hotspot"]
    assert [(b.layer_first, b.column_first, b.cells) for b in hot] == [(21, 101, 4)]
    assert hot[0].value == pytest.approx(matrix[21, 101])
    assert len(bands) == 2


@pytest.mark.parametrize("draw", ["normal", "uniform", "nan"])
def test_noise_has_no_bands(draw):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        matrix = rng.normal(0, 0.1, (36, 800)) if draw == "normal" else rng.uniform(-1, 1, (36, 800))
        if draw == "nan":
            matrix[rng.random(matrix.shape) < 0.05] = np.nan
        assert find_bands(matrix) == [], (draw, seed)


def test_constant_and_empty_matrices_have_no_bands():
    assert find_bands(np.full((6, 10), 0.3)) == []
    assert find_bands(np.zeros((6, 0))) == []
    assert find_bands(np.full((6, 10), np.nan)) == []


def test_the_rule_is_its_thresholds():
    matrix = planted_matrix(np.random.default_rng(0))
    assert [b.type for b in find_bands(matrix, BandRule(horizontal=50.0))] == ["vertical"]
    assert [b.type for b in find_bands(matrix, BandRule(vertical_share=1.01))] == ["horizontal"]


def test_bands_csv_and_figures_of_planted_capture(tmp_path):
    rng = np.random.default_rng(1)
    positions = np.arange(600) + np.arange(600) // 100 * 2  # kNN-like gaps: original positions, not columns
    problems = {n: [agent_handoff(0, planted_matrix(rng), positions=positions)] for n in (4, 9)}
    path = write(tmp_path / "planted.h5", problems, 36)
    result = analyze_capture(path, progress=False, show=1)
    bands = result.bands
    assert list(bands["problem"]) == [4, 4, 9, 9]
    assert list(bands["type"]) == ["horizontal", "vertical"] * 2
    vertical = bands[bands["type"] == "vertical"].iloc[0]
    assert (vertical["column_first"], vertical["column_last"]) == (300, 309)
    assert (vertical["position_first"], vertical["position_last"]) == (306, 315)
    assert (vertical["agent"], vertical["kind"]) == ("planner", "latent")
    assert vertical["tokens"].startswith("<latent>|")
    shares = result.band_layers
    assert shares.loc[shares["share_high"] == 1.0, "layer"].tolist() == [10, 11, 12]
    assert result._bands.frequent_layers("planner_to_critic") == {10: "high", 11: "high", 12: "high"}
    figures = dict(result.figures())
    assert set(figures) == {"bands_planner_to_critic_problem4.png", "profile_planner_to_critic.png",
                            "strip_planner_to_critic_problem4.png", "distributions_planner_to_critic.png",
                            "top_tokens_planner_to_critic.png"}  # show=1: problem 9 has none
    heat = figures["bands_planner_to_critic_problem4.png"].axes[0]
    outlined = [(p.get_x(), p.get_width()) for p in heat.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 1.0)]
    assert outlined == [(299.5, 10.0)]  # the vertical band, in magenta
    folder, written = write_analysis(result, tmp_path / "out", progress=False, figures=False)
    assert len(pd.read_csv(folder / "bands.csv")) == 4


# -- top tokens -----------------------------------------------------------------------------------------

def test_planted_top_tokens_come_out_in_order(tmp_path):
    num_layers, width, layer = 6, 40, 3
    rng = np.random.default_rng(2)
    positions = np.arange(width) * 2 + 5
    planted = {7: ("alpha", 0.9), 30: ("beta", 0.8), 12: ("gamma", 0.7), 25: ("omega", -0.9), 3: ("psi", -0.8)}
    problems = {}
    for number in (1, 2, 3):
        matrix = rng.uniform(-0.1, 0.1, (num_layers, width))
        tokens = [f"t{c}" for c in range(width)]
        for column, (token, value) in planted.items():
            matrix[layer, column] = value
            tokens[column] = token
        problems[number] = [agent_handoff(0, matrix, positions=positions, tokens=tokens)]
    path = write(tmp_path / "tops.h5", problems, num_layers)
    result = analyze_capture(path, top=3, progress=False, show=0)
    assert result.settings["layer"] == num_layers // 2
    table = result.top_tokens
    first = table[table["problem"] == 1]
    assert first["rank"].tolist() == [1, 2, 3, -1, -2, -3]
    assert first["token"].tolist()[:5] == ["alpha", "beta", "gamma", "omega", "psi"]
    assert first["column"].tolist()[:5] == [7, 30, 12, 25, 3]
    assert first["position"].tolist()[:5] == [19, 65, 29, 55, 11]
    assert first["value"].tolist()[:5] == pytest.approx([0.9, 0.8, 0.7, -0.9, -0.8])
    assert first["agent"].tolist()[:5] == ["planner"] * 5
    assert first["kind"].tolist()[:5] == ["prompt", "latent", "prompt", "latent", "prompt"]
    assert (table["layer"] == layer).all() and len(table) == 18
    by_token = result.top_tokens_by_string.set_index(["side", "token"])
    assert by_token.loc[("top", "alpha"), "count"] == 3 and by_token.loc[("top", "alpha"), "n_problems"] == 3
    assert by_token.loc[("top", "alpha"), "rate"] == 1.0
    assert by_token.loc[("bottom", "omega"), "mean_value"] == pytest.approx(-0.9)
    top_rows = result.top_tokens_by_string[result.top_tokens_by_string["side"] == "top"]
    assert top_rows["token"].tolist()[:3] == ["alpha", "beta", "gamma"]


def test_top_tokens_at_every_layer_and_at_a_chosen_layer(tmp_path):
    path = noise_capture(tmp_path / "n.h5", num_layers=4)
    every = analyze_capture(path, top=2, all_layers=True, progress=False, show=0).top_tokens
    assert sorted(every["layer"].unique()) == [0, 1, 2, 3]
    chosen = analyze_capture(path, top=2, layer=0, progress=False, show=0).top_tokens
    assert set(chosen["layer"]) == {0}
    assert chosen.equals(every[every["layer"] == 0].reset_index(drop=True))


# -- profile, distributions, scales -------------------------------------------------------------------------

def test_profile_matches_numpy(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(3)
    matrices = {n: rng.normal(n / 10, 0.2, (5, 30)) for n in (1, 2, 3, 4)}
    matrices[2][1, 4] = np.nan
    path = write(tmp_path / "p.h5", {n: [agent_handoff(0, m)] for n, m in matrices.items()}, 5)
    result = analyze_capture(path, progress=False, show=0)
    profile = result.profile
    assert set(profile.columns) >= {"handoff", "layer", "agent", "kind", "mean", "std", "n_values", "n_problems"}
    row = profile[(profile["layer"] == 1) & (profile["kind"] == "prompt")].iloc[0]
    values = np.concatenate([m[1, :15] for m in matrices.values()])
    values = values[np.isfinite(values)]
    assert row["n_values"] == 59 and row["n_problems"] == 4
    assert row["mean"] == pytest.approx(values.mean(), rel=1e-5)
    assert row["std"] == pytest.approx(values.std(), rel=1e-4)
    per_problem = [np.nanmean(m[1, :15].astype(np.float32)) for m in matrices.values()]
    low, high = stats.t.interval(0.95, 3, loc=np.mean(per_problem), scale=stats.sem(per_problem))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-4)
    per = result.profile_per_problem
    assert len(per) == 4 * 5 * 2
    assert per[(per["problem"] == 2) & (per["layer"] == 1) & (per["kind"] == "prompt")]["n_values"].item() == 14


def test_distributions_match_numpy(tmp_path):
    rng = np.random.default_rng(4)
    matrices = [rng.normal(0, 0.3, (3, 50)).clip(-1, 1) for _ in range(3)]
    path = write(tmp_path / "d.h5", {n + 1: [agent_handoff(0, m)] for n, m in enumerate(matrices)}, 3)
    table = analyze_capture(path, progress=False, show=0).distributions
    values = np.concatenate([m[2] for m in matrices]).astype(np.float32)
    row = table[table["layer"] == 2].iloc[0]
    assert row["n_values"] == 150
    assert (row["min"], row["max"]) == pytest.approx((values.min(), values.max()))
    assert row["mean"] == pytest.approx(values.mean(), rel=1e-5)
    ordered = np.sort(values)
    for name, q in (("q05", 0.05), ("median", 0.5), ("q95", 0.95)):
        # the upper edge of the bin holding the ceil(q n)-th smallest value
        assert 0 <= row[name] - ordered[math.ceil(q * 150) - 1] <= 2.0 / BINS + 1e-6, name


def test_strip_ranges_per_handoff_and_capture(tmp_path):
    path = noise_capture(tmp_path / "s.h5", num_layers=6)
    result = analyze_capture(path, progress=False, show=1, strip_scale="capture")
    ranges = result.strip_ranges
    assert ranges["layer"] == 3
    lows = {label: r[0] for label, r in ranges["handoff"].items()}
    assert ranges["capture"][0] == min(lows.values())
    assert ranges["handoff"]["planner_to_critic"][0] >= -1 and ranges["capture"][1] <= 1
    assert normalise(np.array([0.0, 0.5, 1.0, np.nan]), 0.0, 2.0)[:3].tolist() == [0.0, 0.25, 0.5]
    assert np.isnan(normalise(np.array([np.nan]), 0.0, 1.0)[0])
    names = [name for name, fig in result.figures()]
    assert "strip_critic_to_refiner_problem1.png" in names


def test_jobs_do_not_change_results(tmp_path):
    path = noise_capture(tmp_path / "many.h5", numbers=range(1, 41), num_layers=4, widths=(8, 12))
    one = analyze_capture(path, progress=False, show=0, jobs=1)
    two = analyze_capture(path, progress=False, show=0, jobs=2)
    for name in ("profile", "profile_per_problem", "distributions", "top_tokens", "top_tokens_by_string", "bands"):
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name), check_exact=True)
    assert one.profile["n_problems"].max() == 40


# -- the command ------------------------------------------------------------------------------------------

def test_analyze_command_writes_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = noise_capture(tmp_path / "captures" / "run.h5")
    result = run("analyze", path, "--no-progress", "--top", "2")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "charts" / "run" / "analysis"
    assert "3 problems" in result.output and str(Path("charts/run/analysis")) in result.output
    for name in ("layer_segment_profile.csv", "top_tokens.csv", "bands.csv", "distributions.csv",
                 "top_tokens_by_string.csv", "analysis.json", "profile_critic_to_refiner.png",
                 "distributions_refiner_to_judger.png", "top_tokens_planner_to_critic.png"):
        assert (folder / name).stat().st_size > 0, name
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["settings"]["top"] == 2 and summary["handoffs"] == ["planner_to_critic", "critic_to_refiner",
                                                                        "refiner_to_judger"]
    assert summary["captures"] == [str(path.resolve())]
    top = pd.read_csv(folder / "top_tokens.csv")
    assert list(top.columns) == ["handoff", "problem", "layer", "rank", "column", "position", "token", "agent",
                                 "kind", "value"]
    # the same capture again: same folder; another capture of the same name: a folder of its own
    assert run("analyze", path, "--no-progress", "--no-figures").exit_code == 0
    other = noise_capture(tmp_path / "elsewhere" / "run.h5", seed=5)
    result = run("analyze", other, "--no-progress", "--no-figures")
    assert result.exit_code == 0 and (tmp_path / "charts" / "run_2" / "analysis" / "analysis.json").exists()
    one_error(run("analyze", other, "--out", folder, "--no-progress", "--no-figures"), "holds the results of",
              "--out")


def test_analyze_bad_input_is_one_line(tmp_path):
    path = noise_capture(tmp_path / "run.h5", num_layers=6)
    out = ["--out", tmp_path / "out", "--no-progress", "--no-figures"]
    one_error(run("analyze", path, "--layer", "6", *out), "--layer 6 is out of range", "6 layers (0 to 5)")
    one_error(run("analyze", path, "--layer", "-1", *out), "out of range")
    one_error(run("analyze", path, "--top", "0", *out), "--top")
    one_error(run("analyze", path, "--problems", "9", *out), "no problem 9", "1-3")
    one_error(run("analyze", path, "--problems", "x", *out), "--problems")
    one_error(run("analyze", path, "--transitions", "planner_to_critc", *out), "no hand-off planner_to_critc",
              "did you mean planner_to_critic")
    one_error(run("analyze", tmp_path / "missing.h5", *out), "not found")
    empty = write(tmp_path / "empty.h5", {}, 6)
    one_error(run("analyze", empty, *out), "no committed problems")


def test_unfinished_capture_is_analysed_as_far_as_committed(tmp_path):
    path = noise_capture(tmp_path / "live.h5", numbers=(1, 2), finish=False)
    result = run("analyze", path, "--out", tmp_path / "out", "--no-progress", "--no-figures")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not finished" in notes[0] and "2 problems committed so far" in notes[0]
    summary = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert summary["run"]["finished"] is False and summary["settings"]["problems"] == [1, 2]


def test_token_text_is_never_markup(tmp_path):
    tokens = ["$x$", "$\\frac{1}{2}$", "<b>", "\n", " ", "a"]
    matrix = np.tile(np.linspace(-0.5, 0.5, 6), (4, 1))
    path = write(tmp_path / "t.h5", {1: [agent_handoff(0, matrix, tokens=tokens)]}, 4)
    result = analyze_capture(path, top=3, progress=False, show=1)
    assert result.top_tokens["token"].tolist()[:3] == ["a", " ", "\n"]
    for name, fig in result.figures():
        fig.canvas.draw()  # mathtext would fail or swallow the dollars
        labels = [t for ax in fig.axes for t in ax.get_yticklabels()]
        if name.startswith("top_tokens"):  # drawn literally: the dollars stay, no mathtext
            dollars = [t for t in labels if "$x$" in t.get_text()]
            assert dollars and not any(t.get_parse_math() for t in dollars), [t.get_text() for t in labels]
