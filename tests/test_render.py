"""Render stage: figures, layout, batch rendering (no torch anywhere in here)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from capture.format import CaptureReader, CaptureWriter, Handoff, ProblemRecord, Segment
from capture.selection import parse_problem_spec
from render import layout
from render.batch import RenderOptions, build_figure, figure_filename, render_capture
from render.colormaps import NAN_COLOR, scale_for
from render.figures import multi_layer_heatmap, normalise_row, single_layer_strip

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "pixel_stats.json"
AGENTS = ("planner", "critic", "refiner", "judger")


# -- synthetic captures (also used by test_render_cli.py) -------------------------------------------

def make_handoffs(number: int, num_layers: int, widths, rng, matrix=None, gap_every: int = 0) -> list[Handoff]:
    """Hand-offs planner->critic->refiner->judger with T = widths[i]; matrix(i, L, T) overrides values."""
    handoffs = []
    for i, width in enumerate(widths):
        values = (matrix(i, num_layers, width) if matrix is not None
                  else rng.uniform(-1, 1, (num_layers, width)))
        positions = np.arange(width, dtype=np.int64)
        if gap_every and width:
            positions = positions + positions // gap_every * 3  # 3 positions removed every gap_every columns
        half = width // 2
        segments = [Segment(AGENTS[i], "prompt", 0, half), Segment(AGENTS[i], "latent", half, width)] if width else []
        tokens = [f"t{j}" if j < half else "<latent>" for j in range(width)]
        handoffs.append(Handoff(AGENTS[i], AGENTS[i + 1], np.asarray(values), positions, tokens, segments))
    return handoffs


def write_capture(path: Path, numbers=(1, 2), num_layers: int = 6, widths=(12, 20, 28), matrix=None,
                  attrs: dict | None = None, finish: bool = True, seed: int = 0, gap_every: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    run_attrs = {"model_name": "toy/model", "method": "latent_mas", "similarity": "seed",
                 "num_layers": num_layers, "latent_steps": 4, "knn_filter": bool(gap_every)}
    run_attrs.update(attrs or {})
    with CaptureWriter.open(path, run_attrs, {"seed": seed}, num_layers, dtype="float32", overwrite=True) as writer:
        for number in numbers:
            handoffs = make_handoffs(number, num_layers, widths, rng, matrix, gap_every)
            writer.append(ProblemRecord(number, f"question {number}", str(number), str(number + number % 2),
                                        number % 2 == 0, handoffs))
        if finish:
            writer.finish("2025-01-01T00:00:00", {"accuracy": 0.5})
    return path


def heat_pixels(fig, image: np.ndarray) -> np.ndarray:
    """The heatmap area (fig.axes[0]) of a rendered image [H, W, 3|4], inset by 2 px."""
    left, bottom, width, height = fig.axes[0].get_position().bounds
    h, w = image.shape[:2]
    x0, x1 = int(np.ceil(left * w)) + 2, int(np.floor((left + width) * w)) - 2
    y0, y1 = int(np.ceil((1 - bottom - height) * h)) + 2, int(np.floor((1 - bottom) * h)) - 2
    return image[y0:y1, x0:x1, :3]


def rgb255(colour) -> np.ndarray:
    return np.asarray(to_rgb(colour)) * 255


def draw(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba(), dtype=float)


# -- file names --------------------------------------------------------------------------------------

def test_figure_filenames_follow_the_reference_naming():
    assert figure_filename("multi", "planner_to_critic", 3) == "heatmap_planner_to_critic_problem3.png"
    assert figure_filename("single", "critic_to_refiner", 12) == "heatmap_singlelayer_critic_to_refiner_problem12.png"
    assert figure_filename("multi", "planner_to_critic", 3, "svg", occurrence=2) == \
        "heatmap_planner_to_critic_problem3_2.svg"


def test_render_capture_names_files_by_the_stored_problem_numbers(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(4, 7))
    written = render_capture(capture, tmp_path / "charts", progress=False)
    names = sorted(p.name for p in written)
    expected = sorted(
        f"heatmap_{prefix}{name}_problem{n}.png"
        for n in (4, 7) for prefix in ("", "singlelayer_")
        for name in ("planner_to_critic", "critic_to_refiner", "refiner_to_judger"))
    assert names == expected
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == expected
    assert not list((tmp_path / "charts").glob("*.tmp"))


def test_problem_and_transition_selection(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1, 2, 3, 5))
    written = render_capture(capture, tmp_path / "out", kinds=("multi",), problems="2-3,5",
                             transitions="critic_to_refiner", progress=False)
    assert sorted(p.name for p in written) == [
        f"heatmap_critic_to_refiner_problem{n}.png" for n in (2, 3, 5)]


def test_parse_problem_spec():
    assert parse_problem_spec("1-5,9") == {1, 2, 3, 4, 5, 9}
    assert parse_problem_spec(" 3 , 7-8 ") == {3, 7, 8}
    assert parse_problem_spec(None) is None
    assert parse_problem_spec([2, 4]) == {2, 4}
    for bad in ("x", "1-", "5-1", "1,,2", "-3", "1-2-3"):
        with pytest.raises(ValueError):
            parse_problem_spec(bad)


# -- colours and orientation ------------------------------------------------------------------------

def test_top_layers_green_bottom_layers_red_in_the_png(tmp_path):
    """+1 in the top half of the layers, -1 in the bottom half: RdYlGn's extreme green must be above its red."""
    num_layers, width = 8, 40

    def halves(i, num_layers, width):
        values = np.full((num_layers, width), -1.0)
        values[num_layers // 2:] = 1.0
        return values

    capture = write_capture(tmp_path / "run.h5", numbers=(1,), num_layers=num_layers, widths=(width,),
                            matrix=halves)
    out = render_capture(capture, tmp_path / "charts", kinds=("multi",), progress=False)
    png = imread(out[0]) * 255
    with CaptureReader(capture) as reader:
        handoff = next(reader.handoffs(1))
    fig = build_figure("multi", handoff, 1, RenderOptions(), "seed", notes=("model: toy/model",))
    assert png.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
    area = heat_pixels(fig, png)
    x0, y0, x1, y1 = fig.render_info.layout.heat_pixels(fig.dpi)
    assert abs((x1 - x0 - 4) - area.shape[1]) <= 1 and abs((y1 - y0 - 4) - area.shape[0]) <= 1
    rows = area.shape[0]
    top, bottom = area[: rows // 2 - 2], area[rows // 2 + 2:]
    green = np.asarray(colormaps["RdYlGn"](1.0)[:3]) * 255
    red = np.asarray(colormaps["RdYlGn"](0.0)[:3]) * 255
    # every pixel away from the segment boundary line is exactly the extreme colour
    assert np.median(np.abs(top - green).max(axis=-1)) <= 2
    assert np.median(np.abs(bottom - red).max(axis=-1)) <= 2
    assert (np.abs(top - green).max(axis=-1) <= 2).mean() > 0.9
    assert (np.abs(bottom - red).max(axis=-1) <= 2).mean() > 0.9


def test_pixel_statistics_match_golden():
    """Per-layer mean colour of a pinned random matrix (ramp from -0.9 at layer 0 to +0.9 at the top).

    Catches a flipped layer axis, a wrong or reversed colormap or a wrong scale. Regenerate with
    LATENTMAS_UPDATE_GOLDEN=1 after an intended visual change.
    """
    rng = np.random.default_rng(0)
    num_layers, width = 12, 80
    ramp = np.linspace(-0.9, 0.9, num_layers)[:, None]
    values = np.clip(ramp + rng.normal(0, 0.05, (num_layers, width)), -1, 1)
    fig = multi_layer_heatmap(values, title="golden")
    area = heat_pixels(fig, draw(fig))
    # one mean colour per layer band, top of the image = highest layer
    bands = np.array_split(area, num_layers, axis=0)
    means = np.array([band[1:-1].reshape(-1, 3).mean(axis=0) for band in bands])[::-1]  # layer 0 first
    # independent of the golden file: each layer's colour is RdYlGn at its mean value
    expected = np.array([np.asarray(colormaps["RdYlGn"]((v + 1) / 2)[:3]) * 255 for v in ramp[:, 0]])
    assert np.abs(means - expected).max() < 25
    assert means[0, 0] > means[0, 1] and means[-1, 1] > means[-1, 0]  # red at layer 0, green at the top
    stats = {"layer_mean_rgb": np.round(means, 1).tolist(), "shape": list(area.shape)}
    if os.environ.get("LATENTMAS_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(stats, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["shape"] == stats["shape"]
    assert np.abs(np.asarray(golden["layer_mean_rgb"]) - means).max() <= 3.0


def test_attention_mode_uses_a_sequential_scale_from_zero():
    values = np.array([[0.0, 0.1], [0.2, 0.4]])
    scale = scale_for("attention", values)
    assert (scale.cmap, scale.vmin, scale.vmax) == ("viridis", 0.0, 0.4)
    assert scale_for("seed", values).cmap == "RdYlGn"
    assert (scale_for("seed", values).vmin, scale_for(None, values).vmax) == (-1.0, 1.0)
    info = multi_layer_heatmap(values, mode="attention").render_info
    assert (info.cmap, info.vmin, info.vmax) == ("viridis", 0.0, pytest.approx(0.4))
    info = multi_layer_heatmap(values, mode="attention", cmap="magma", vmax=1.0).render_info
    assert (info.cmap, info.vmin, info.vmax) == ("magma", 0.0, 1.0)


# -- single layer --------------------------------------------------------------------------------

def test_single_layer_title_has_the_raw_range_and_uses_the_middle_layer():
    values = np.zeros((5, 4))
    values[2] = [-0.234, 0.891, 0.5, 0.0]   # layer 5 // 2 = 2
    fig = single_layer_strip(values, title="Planner → Critic · problem 1")
    title = fig.get_suptitle()
    assert "Range: [-0.234, 0.891]" in title
    assert "layer 2 of 5" in title
    drawn = fig.render_info.values
    assert drawn.shape == (1, 4) and fig.render_info.cmap == "YlOrRd"
    assert drawn.min() == pytest.approx(0) and drawn.max() == pytest.approx(1)
    assert drawn[0, 1] == pytest.approx(1)


def test_constant_row_gives_zeros_not_nan():
    normalised, lo, hi = normalise_row(np.full(7, 0.42))
    assert np.array_equal(normalised, np.zeros(7)) and lo == hi == pytest.approx(0.42)
    fig = single_layer_strip(np.full((3, 7), 0.42))
    drawn = fig.render_info.values
    assert not np.isnan(drawn).any() and (drawn == 0).all()
    assert "Range: [0.420, 0.420]" in fig.get_suptitle()
    # and on screen: every cell is the colormap's low end, none is the NaN grey
    area = heat_pixels(fig, draw(fig))
    low = np.asarray(colormaps["YlOrRd"](0.0)[:3]) * 255
    assert (np.abs(area - low).max(axis=-1) <= 2).mean() > 0.97


def test_normalise_row_keeps_nan_and_ignores_it_for_the_range():
    normalised, lo, hi = normalise_row(np.array([np.nan, 1.0, 3.0]))
    assert np.isnan(normalised[0]) and normalised[1:].tolist() == [0.0, 1.0] and (lo, hi) == (1.0, 3.0)
    normalised, lo, hi = normalise_row(np.array([np.nan, np.nan]))
    assert np.isnan(normalised).all() and np.isnan(lo)


# -- NaN, empty, gaps, segments -------------------------------------------------------------------------

def test_nan_cells_are_grey_and_counted_in_the_title():
    values = np.random.default_rng(0).uniform(-1, 1, (6, 30))
    values[1, 3:15] = np.nan
    fig = multi_layer_heatmap(values, title="x")
    assert "12 NaN cells" in fig.get_suptitle()
    area = heat_pixels(fig, draw(fig))
    grey = (np.abs(area - rgb255(NAN_COLOR)).max(axis=-1) <= 1).mean()
    assert 0.03 < grey < 0.1   # 12 of 180 cells
    strip = single_layer_strip(values, title="x")
    assert "NaN" not in strip.get_suptitle()  # the middle layer (3) has none


def test_empty_handoff_draws_a_message_not_a_traceback(tmp_path):
    fig = multi_layer_heatmap(np.zeros((6, 0)), title="Planner → Critic · problem 1")
    texts = [t.get_text() for t in fig.texts]
    assert "empty cache (T = 0)" in texts
    assert "empty cache (T = 0)" in [t.get_text() for t in single_layer_strip(np.zeros((6, 0))).texts]
    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(0, 5))
    written = render_capture(capture, tmp_path / "charts", progress=False)
    assert len(written) == 4 and all(p.stat().st_size > 0 for p in written)


def test_knn_gaps_are_found_and_marked():
    gaps = layout.find_gaps(np.array([0, 1, 2, 6, 7, 9]))
    assert gaps.columns.tolist() == [3, 5] and gaps.removed == 4
    assert layout.find_gaps(np.array([2, 3])).columns.tolist() == [0]
    assert len(layout.find_gaps(np.arange(5))) == 0
    fig = multi_layer_heatmap(np.zeros((4, 6)), positions=np.array([0, 1, 2, 6, 7, 9]))
    assert "kNN removed 4 positions in 2 runs" in fig.get_suptitle()
    marks = [line for line in fig.axes[0].lines if line.get_marker() == "^"]
    assert len(marks) == 1 and marks[0].get_xdata().tolist() == [2.5, 4.5]


def test_segment_labels_do_not_overlap():
    segments = [Segment("planner", "prompt", 0, 900), Segment("planner", "latent", 900, 910),
                Segment("critic", "prompt", 910, 1990), Segment("critic", "latent", 1990, 2000)]
    placed = layout.place_segment_labels(segments, 2000, layout.plot_width_in(2000))
    assert len(placed) == 4
    in_per_column = layout.plot_width_in(2000) / 2000
    for row in {p.row for p in placed}:
        spans = sorted(((p.x + 0.5) * in_per_column - layout.text_width_in(p.text, layout.SEGMENT_LABEL_PT) / 2,
                        (p.x + 0.5) * in_per_column + layout.text_width_in(p.text, layout.SEGMENT_LABEL_PT) / 2)
                       for p in placed if p.row == row)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert layout.segment_boundaries(segments, 2000) == [900, 910, 1990]


# -- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 40, 450, 2000, 2900, 20000])
def test_figure_size_is_bounded_and_tokens_get_a_pixel_up_to_the_cap(width):
    fig = multi_layer_heatmap(np.zeros((36, width)), dpi=100)
    px_w, px_h = fig.get_figwidth() * 100, fig.get_figheight() * 100
    assert px_w <= 2400 and px_h <= 1000
    heat_w_px = fig.axes[0].get_position().width * px_w
    if width <= 2000:
        assert heat_w_px / width >= 1.0
    assert fig.axes[0].images[0].get_interpolation() == ("nearest" if width <= 2000 else "antialiased")


def test_token_labels_only_where_they_fit():
    tokens = [f"tok{i}" for i in range(30)]
    fig = multi_layer_heatmap(np.zeros((4, 30)), tokens=tokens, token_labels=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == tokens
    many = [f"tok{i}" for i in range(layout.max_labelled_tokens() + 1)]
    fig = multi_layer_heatmap(np.zeros((4, len(many))), tokens=many, token_labels=True)
    assert len(fig.axes[0].get_xticks()) < 20
    assert layout.format_token("a\nb$c") == "a↵b$c"  # drawn as text (parse_math off), so no escaping


def test_token_labels_notice_for_long_handoffs(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(10, layout.max_labelled_tokens() + 5))
    notes = []
    render_capture(capture, tmp_path / "charts", token_labels=True, progress=False, warn=notes.append)
    assert len(notes) == 1 and "token strings fit only up to" in notes[0] and "1 hand-offs" in notes[0]


# -- parallel rendering --------------------------------------------------------------------------

def test_jobs_2_writes_the_same_figures_as_jobs_1(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1, 2, 3))
    one = render_capture(capture, tmp_path / "one", progress=False)
    two = render_capture(capture, tmp_path / "two", jobs=2, progress=False)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two):
        assert imread(a).shape == imread(b).shape
        assert np.array_equal(imread(a), imread(b))


# -- the documented h5py example ---------------------------------------------------------------------

def documented_example() -> str:
    text = (REPO / "docs" / "capture-format.md").read_text()
    match = re.search(r"<!-- minimal-capture-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/capture-format.md lost its minimal-capture example"
    return match.group(1)


def test_documented_h5py_example_writes_a_file_the_renderer_accepts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(documented_example(), "capture-format.md", "exec"), {"__name__": "docs_example"})
    path = tmp_path / "minimal_capture.h5"
    with CaptureReader(path) as reader:
        assert reader.problem_numbers == [1]
        handoff = next(reader.handoffs(1))
        assert handoff.layer_similarities.shape == (4, 6)
        assert [s.kind for s in handoff.segments] == ["prompt", "latent"]
    written = render_capture(path, tmp_path / "charts", token_labels=True, progress=False)
    assert sorted(p.name for p in written) == ["heatmap_planner_to_critic_problem1.png",
                                               "heatmap_singlelayer_planner_to_critic_problem1.png"]


# -- no torch ------------------------------------------------------------------------------------

def test_render_sources_never_import_torch_or_transformers():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|transformers)\b", re.M)
    for source in (REPO / "render").glob("*.py"):
        assert not pattern.search(source.read_text()), source


# -- notebooks: ax=, windows, inline display, backend ---------------------------------------------------

def test_two_handoffs_share_one_figure_through_ax(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from render.figures import plot_handoff

    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(30, 60), gap_every=10)
    with CaptureReader(capture) as reader:
        first, second = reader.handoffs(1)
    fig = Figure(figsize=(12, 7), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    assert plot_handoff(first, ax=top, problem=1) is fig
    assert plot_handoff(second, "single", ax=fig.add_gridspec(1, 1)[0]) is fig  # a SubplotSpec makes its axes
    assert top.render_info.values.shape == (6, 30) and fig.axes[-2].render_info.values.shape == (1, 60)
    assert top.get_title(loc="left").startswith("Planner → Critic · problem 1")
    assert top.get_xlim() == (-0.5, 29.5)
    marks = [line for line in top.lines if line.get_marker() == "^"]
    assert marks[0].get_xdata().tolist() == [9.5, 19.5]  # kNN gaps at their columns
    draw(fig)  # lays out and draws without error


def test_a_window_of_columns_keeps_its_true_axis():
    values = np.tile(np.arange(100, dtype=float), (4, 1)) / 100
    positions = np.arange(100) + np.arange(100) // 25 * 2  # 2 positions removed before columns 25, 50, 75
    segments = [Segment("planner", "prompt", 0, 40), Segment("planner", "latent", 40, 100)]
    fig = multi_layer_heatmap(values, segments=segments, positions=positions, columns=(30, 60))
    ax = fig.axes[0]
    assert ax.get_xlim() == (29.5, 59.5) and fig.render_info.column_offset == 30
    np.testing.assert_array_equal(fig.render_info.values, values[:, 30:60].astype(np.float32))
    assert all(30 <= t < 60 for t in ax.get_xticks()) and "column 30 … 59" in ax.get_xlabel()
    assert "columns 30 … 59" in fig.get_suptitle() and "kNN removed 2 positions in 1 run" in fig.get_suptitle()
    marks = [line for line in ax.lines if line.get_marker() == "^"]
    assert marks[0].get_xdata().tolist() == [49.5]
    assert ax.collections[0].get_segments()[0][0][0] == 39.5  # the prompt/latent boundary at its true column
    # the same window, cut by the caller: column_offset; the gap before its first column is unknown there
    cut = multi_layer_heatmap(values[:, 50:60], positions=positions[50:60], column_offset=50)
    assert cut.axes[0].get_xlim() == (49.5, 59.5) and "kNN" not in cut.get_suptitle()
    with pytest.raises(ValueError, match="not a window"):
        multi_layer_heatmap(values, columns=(60, 200))


def test_file_text_is_drawn_literally_never_as_mathtext():
    """Titles, agent and model names from a capture may hold '$': drawn as typed, and a bad TeX
    command must not break the figure."""
    values = np.zeros((4, 12))
    segments = [Segment(r"$\undefinedcmd$", "prompt", 0, 6), Segment("a$x^2$b", "latent", 6, 12)]
    for draw_figure in (multi_layer_heatmap, single_layer_strip):
        fig = draw_figure(values, title=r"my $x^2$ model $\undefinedcmd$", segments=segments,
                          notes=(r"model: $\undefinedcmd$",))
        draw(fig)  # mathtext would raise on \undefinedcmd
        assert r"my $x^2$ model $\undefinedcmd$" in fig.get_suptitle()
        texts = [fig._suptitle, *fig.axes[0].texts]
        assert any(r"$\undefinedcmd$" in t.get_text() for t in fig.axes[0].texts)
        assert all(not t.get_parse_math() for t in texts if "$" in t.get_text())
    tokens = ["$a$", r"$\bad$"] + ["t"] * 10
    fig = multi_layer_heatmap(values, tokens=tokens, token_labels=True)
    draw(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()[:2]] == ["$a$", r"$\bad$"]


def test_infinite_cells_are_drawn_apart_from_nan_and_counted_as_inf():
    from render.figures import NEG_INF_COLOR, POS_INF_COLOR

    values = np.zeros((4, 40))
    values[0, :10] = np.inf
    values[1, :10] = -np.inf
    values[2, :10] = np.nan
    fig = multi_layer_heatmap(values)
    title = fig.get_suptitle()
    assert "10 +Inf cells (black)" in title and "10 −Inf cells (white)" in title and "10 NaN cells (grey)" in title
    area = heat_pixels(fig, draw(fig))
    rows = np.array_split(area, 4, axis=0)[::-1]  # layer 0 first
    left = [band[2:-2, 2: area.shape[1] // 4 - 4].reshape(-1, 3) for band in rows]
    for band, colour in zip(left, (POS_INF_COLOR, NEG_INF_COLOR, NAN_COLOR)):
        assert np.abs(band - rgb255(colour)).max() <= 2
    strip = single_layer_strip(values, layer=0)
    assert "10 +Inf cells (black)" in strip.get_suptitle() and "NaN" not in strip.get_suptitle()


def test_a_figure_knows_how_to_show_itself_as_png():
    fig = multi_layer_heatmap(np.zeros((4, 10)))
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")
    image = imread(__import__("io").BytesIO(png))
    assert image.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))


def test_importing_render_leaves_the_backend_and_pyplot_alone(tmp_path):
    import subprocess
    import sys

    code = ("import sys, matplotlib; matplotlib.use('svg'); import numpy as np, render; "
            "render.multi_layer_heatmap(np.zeros((3, 5))).canvas.draw(); render.plot_handoff; "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]


# -- x axis: columns or original cache positions ---------------------------------------------

@pytest.mark.parametrize("draw_figure", [multi_layer_heatmap, single_layer_strip])
def test_position_axis_labels_ticks_with_the_positions_at_those_columns(draw_figure):
    values = np.tile(np.linspace(-1, 1, 120), (6, 1))
    positions = np.arange(120) * 2 + np.arange(120) // 30 * 7  # every other position, and kNN gaps of 7
    fig = draw_figure(values, positions=positions, x_axis="position")
    ax = fig.axes[0]
    ticks = ax.get_xticks().astype(int)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ticks) >= 2 and labels == [str(positions[t]) for t in ticks]
    assert labels != [str(t) for t in ticks]
    assert "original KV cache position 0 … " + str(positions[-1]) in ax.get_xlabel()
    columns = draw_figure(values, positions=positions)  # the default: column numbers
    assert [t.get_text() for t in columns.axes[0].get_xticklabels()] == [str(t) for t in columns.axes[0].get_xticks().astype(int)]


def test_position_axis_in_a_window_uses_the_window_positions():
    values = np.tile(np.arange(100, dtype=float), (4, 1)) / 100
    positions = np.arange(100) * 3 + 1000
    fig = multi_layer_heatmap(values, positions=positions, columns=(30, 60), x_axis="position")
    ax = fig.axes[0]
    ticks = ax.get_xticks().astype(int)
    assert all(30 <= t < 60 for t in ticks)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(positions[t]) for t in ticks]


def test_unknown_x_axis_is_refused():
    with pytest.raises(ValueError, match="unknown x axis 'layer'"):
        multi_layer_heatmap(np.zeros((2, 3)), x_axis="layer")


@pytest.mark.parametrize("kind", ["multi", "single"])
def test_render_options_x_axis_reaches_the_figure_kinds(tmp_path, kind):
    path = write_capture(tmp_path / "knn.h5", numbers=(1,), widths=(60,), gap_every=10)
    with CaptureReader(path) as reader:
        handoff = next(reader.handoffs(1))
    fig = build_figure(kind, handoff, 1, RenderOptions(x_axis="position"), "seed")
    ax = fig.axes[0]
    ticks = ax.get_xticks().astype(int)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(handoff.positions[t]) for t in ticks]
    assert handoff.positions[-1] > 59  # the gaps make positions differ from columns
