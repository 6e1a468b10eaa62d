"""`latentmas compare`: alignment by original position, a planted kNN drop set, refusals; and analyze/compare
on real tiny-qwen3 captures with kNN off and on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_analysis import agent_handoff, noise_capture, one_error, run, write  # pytest puts tests/ on sys.path

from render.analysis import compare_captures, wasserstein_by_layer
from render.analysis.source import AnalysisError

KNN_ATTRS = {"knn_filter": True, "knn_percentage": 0.8, "knn_min_keep": 2, "knn_strategy": "top",
             "knn_score": "seed"}


def test_a_capture_compared_with_itself_is_all_zeros(tmp_path):
    path = noise_capture(tmp_path / "a.h5", numbers=(1, 2, 3), num_layers=5)
    result = compare_captures(path, path, progress=False, show=1)
    table = result.table
    assert len(table) == 9 and result.identical
    assert (table[["only_a", "only_b", "max_abs_diff", "mean_abs_diff", "wasserstein_max"]] == 0).all().all()
    assert (table["common"] == table["columns_a"]).all()
    assert (result.layers["wasserstein"] == 0).all() and result.knn is None
    assert result.num_figures == 6  # a per-layer figure per hand-off, a difference heatmap per shown one
    name, figure = next(result.figures())
    assert name == "compare_planner_to_critic.png" and figure.axes


def test_columns_are_aligned_by_original_position(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.uniform(-0.5, 0.5, (4, 20))
    kept = np.array([0, 1, 2, 5, 6, 9, 12, 13, 14, 15, 18, 19])  # B lost 8 positions, and is shifted by 0.25
    a = write(tmp_path / "a.h5", {1: [agent_handoff(0, full)]}, 4)
    b = write(tmp_path / "b.h5", {1: [agent_handoff(0, full[:, kept] + 0.25, positions=kept)]}, 4)
    row = compare_captures(a, b, progress=False, show=1).table.iloc[0]
    assert (row["common"], row["only_a"], row["only_b"]) == (12, 8, 0)
    assert row["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert row["mean_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert row["token_mismatches"] == 0


def test_wasserstein_by_layer_matches_scipy():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (6, 50)), rng.normal(0.3, 2, (6, 37))
    b[2, 5] = np.nan
    got = wasserstein_by_layer(a, b)
    want = [wasserstein_distance(a[l], b[l][np.isfinite(b[l])]) for l in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(wasserstein_by_layer(a, b[:, :0])).all()


def _planted_knn(tmp_path, drop_lowest: bool):
    """An unfiltered capture and a kNN-filtered one of 2 problems x 2 hand-offs with planted drop sets.

    Hand-off 1 holds positions 0..9, hand-off 2 positions 0..15 (6 new ones). The middle layer (2 of 5)
    ranks the columns. Returns (a, b, planted) with planted: (problem, handoff) -> dropped positions."""
    num_layers, layer = 5, 2
    rng = np.random.default_rng(2)
    unfiltered, filtered, planted = {}, {}, {}
    for number in (1, 2):
        full = rng.uniform(-0.5, 0.5, (num_layers, 16))
        full[layer] = np.linspace(0.9, -0.6, 16)[rng.permutation(16)]  # distinct scores
        first = full[:, :10]
        # hand-off 1: 10 candidates, keep 8: the 2 most recent (8, 9) always, 6 of the 8 older ones
        older = np.arange(8)
        ranked = older[np.argsort(-first[layer, older])]
        dropped1 = np.sort(ranked[-2:] if drop_lowest else ranked[:2])
        kept1 = np.setdiff1d(np.arange(10), dropped1)
        # hand-off 2: candidates = kept1 + positions 10..15 (14), keep 11: 14, 15 always, 9 of 12 older
        candidates = np.concatenate([kept1, np.arange(10, 16)])
        older2 = candidates[:-2]
        ranked2 = older2[np.argsort(-full[layer, older2])]
        dropped2 = np.sort(ranked2[-3:] if drop_lowest else ranked2[:3])
        kept2 = np.setdiff1d(candidates, dropped2)
        unfiltered[number] = [agent_handoff(0, first), agent_handoff(1, full)]
        filtered[number] = [agent_handoff(0, first[:, kept1], positions=kept1,
                                          tokens=[agent_handoff(0, first).tokens[p] for p in kept1],
                                          segments=_segments_of(agent_handoff(0, first), kept1)),
                            agent_handoff(1, full[:, kept2], positions=kept2,
                                          tokens=[agent_handoff(1, full).tokens[p] for p in kept2],
                                          segments=_segments_of(agent_handoff(1, full), kept2))]
        planted[(number, "planner_to_critic")] = dropped1.tolist()
        planted[(number, "critic_to_refiner")] = dropped2.tolist()
    a = write(tmp_path / "plain.h5", unfiltered, num_layers)
    b = write(tmp_path / "knn.h5", filtered, num_layers, attrs=KNN_ATTRS)
    return a, b, planted, unfiltered


def _segments_of(handoff, kept):
    from capture.format import Segment

    out = []
    for s in handoff.segments:
        first, last = np.searchsorted(kept, [s.start, s.stop])
        if last > first:
            out.append(Segment(s.agent, s.kind, int(first), int(last)))
    return out


@pytest.mark.parametrize("drop_lowest", [True, False])
def test_a_planted_knn_drop_set_is_reported_exactly(tmp_path, drop_lowest):
    a, b, planted, unfiltered = _planted_knn(tmp_path, drop_lowest)
    result = compare_captures(b, a, progress=False, show=0)  # the filtered one first: found by its attributes
    knn = result.knn
    assert knn is not None and knn.filtered == "a" and knn.layer == 2
    dropped = knn.dropped
    got = {key: group["position"].tolist() for key, group in dropped.groupby(["problem", "handoff"], sort=False)}
    assert got == planted
    for row in dropped.itertuples():
        source = unfiltered[row.problem][0 if row.handoff == "planner_to_critic" else 1]
        assert row.token == source.tokens[row.position]
        assert row.value == pytest.approx(source.layer_similarities[2, row.position])
        segment = next(s for s in source.segments if s.start <= row.position < s.stop)
        assert (row.agent, row.kind) == (segment.agent, segment.kind)
        assert not row.protected
    summary = knn.summary.set_index(["problem", "handoff"])
    first, second = summary.loc[(1, "planner_to_critic")], summary.loc[(1, "critic_to_refiner")]
    assert (first["candidates"], first["kept"], first["expected_kept"], first["dropped"]) == (10, 8, 8, 2)
    assert (second["candidates"], second["kept"], second["expected_kept"], second["dropped"],
            second["dropped_earlier"]) == (14, 11, 11, 3, 2)
    assert bool(first["exact_scores"]) and not bool(second["exact_scores"])
    assert (summary["kept_are_top"] == drop_lowest).all()
    assert (summary["top_overlap"] == 1.0).all() == drop_lowest
    by_segment = knn.by_segment.set_index(["handoff", "agent", "kind"])
    total = by_segment["dropped"].sum()
    assert total == sum(len(v) for v in planted.values())


def test_knn_tables_are_written(tmp_path):
    a, b, planted, _ = _planted_knn(tmp_path, True)
    result = run("compare", a, b, "--out", tmp_path / "out", "--no-progress", "--no-figures")
    assert result.exit_code == 0, result.output
    dropped = pd.read_csv(tmp_path / "out" / "knn_dropped.csv")
    assert len(dropped) == sum(len(v) for v in planted.values())
    compare = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert {"problem", "handoff", "common", "only_a", "only_b", "max_abs_diff", "mean_abs_diff"} <= set(compare)
    assert compare["only_b"].sum() == 0 and compare["only_a"].sum() == len(dropped) + 2 * 2  # h2 lacks h1's drops
    summary = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert summary["knn"]["kept_are_top"] == {"checked": 4, "true": 4}


def test_problems_with_other_questions_are_refused(tmp_path):
    a = noise_capture(tmp_path / "a.h5", numbers=(1, 2))
    b = noise_capture(tmp_path / "b.h5", numbers=(1, 2), questions={2: "a different question"})
    line = one_error(run("compare", a, b, "--out", tmp_path / "out", "--no-progress"),
                     "problem 2 differs", "a different question", "same problems")
    assert "question 2" in line
    with pytest.raises(AnalysisError, match="problem 2 differs"):
        compare_captures(a, b, progress=False)


def test_compare_bad_input_is_one_line(tmp_path):
    a = noise_capture(tmp_path / "a.h5", numbers=(1, 2), num_layers=4)
    out = ["--out", tmp_path / "out", "--no-progress", "--no-figures"]
    one_error(run("compare", a, noise_capture(tmp_path / "b.h5", num_layers=6), *out), "4 layers", "6",
              "same number of layers")
    one_error(run("compare", a, noise_capture(tmp_path / "c.h5", numbers=(5, 6), num_layers=4), *out),
              "no selected problem in common")
    one_error(run("compare", a, write(tmp_path / "empty.h5", {}, 4), *out), "no committed problems")
    one_error(run("compare", a, a, "--transitions", "nope", *out), "no hand-off nope")
    other_model = noise_capture(tmp_path / "m.h5", numbers=(1, 2), num_layers=4, attrs={"model_name": "other"})
    result = run("compare", a, other_model, *out)
    assert result.exit_code == 0 and "different models" in result.output


def test_default_compare_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = noise_capture(tmp_path / "off.h5", numbers=(1,))
    result = run("compare", a, a, "--no-progress", "--no-figures")
    assert result.exit_code == 0 and "identical" in result.output
    assert (tmp_path / "charts" / "compare_off_vs_off" / "compare.csv").exists()


# -- real captures of tiny-qwen3 -------------------------------------------------------------------------------

def capture(name: str, *extra: str):
    result = run("capture", "--model_name", "tiny-qwen3", "--device", "cpu", "--max_samples", "2",
                 "--max_new_tokens", "8", "--latent_steps", "3", "--temperature", "0", "--output_dir", "runs",
                 "--capture_file", f"captures/{name}.h5", *extra)
    assert result.exit_code == 0, result.output
    return f"captures/{name}.h5"


@pytest.mark.slow
def test_tiny_qwen3_knn_off_and_on(workdir):
    off, on, again = capture("off"), capture("on", "--knn_filter"), capture("again")
    for path, figures in ((off, "--no-figures"), (on, "--figures")):
        result = run("analyze", path, "--no-progress", "--show", "1", figures)
        assert result.exit_code == 0, result.output
    stem_folder = workdir / "charts" / "on" / "analysis"
    profile = pd.read_csv(stem_folder / "layer_segment_profile.csv")
    assert {"planner", "critic", "refiner"} <= set(profile["agent"]) and (profile["n_values"] > 0).all()
    top = pd.read_csv(stem_folder / "top_tokens.csv")
    num_layers = profile["layer"].max() + 1
    assert len(top) == 2 * 3 * 20 and (top["layer"] == num_layers // 2).all()
    result = run("compare", off, on, "--no-progress", "--show", "1")
    assert result.exit_code == 0, result.output
    folder = workdir / "charts" / "compare_off_vs_on"
    summary = pd.read_csv(folder / "knn_summary.csv")
    first = summary[summary["handoff"] == "planner_to_critic"]
    # the first hand-off: both runs held the same cache before the trim, so the check is exact
    assert first["exact_scores"].all() and first["kept_are_top"].all() and (first["top_overlap"] == 1).all()
    assert (summary["kept"] == summary["expected_kept"]).all() and (summary["protected_dropped"] == 0).all()
    compare = pd.read_csv(folder / "compare.csv")
    assert (compare["only_b"] == 0).all() and (compare["only_a"] > 0).all()
    assert (compare.loc[compare["handoff"] == "planner_to_critic", "max_abs_diff"] == 0).all()
    assert {"knn_dropped.csv", "knn_dropped.png", "difference_critic_to_refiner_problem1.png"} <= {
        p.name for p in folder.iterdir()}
    result = run("compare", off, again, "--no-progress", "--no-figures")
    assert result.exit_code == 0 and "identical" in result.output, result.output
    same = pd.read_csv(workdir / "charts" / "compare_off_vs_again" / "compare.csv")
    assert (same[["only_a", "only_b", "max_abs_diff", "mean_abs_diff", "wasserstein_max"]] == 0).all().all()


def test_layer_shift_interval_is_the_t_interval_of_the_mean():
    from scipy import stats

    from render.analysis.compare import t_interval

    values = np.array([0.1, 0.4, 0.35, 0.2, 0.9])
    expected = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    np.testing.assert_allclose(t_interval(values), expected)
    assert t_interval(np.array([0.3])) == (0.3, 0.3)


def test_wasserstein_by_layer_with_many_ties_matches_scipy():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 4, (5, 40)).astype(float), rng.integers(1, 5, (5, 23)).astype(float)
    want = [wasserstein_distance(a[l], b[l]) for l in range(5)]
    np.testing.assert_allclose(wasserstein_by_layer(a, b), want, rtol=1e-12)
    assert (wasserstein_by_layer(a, a) == 0).all()
