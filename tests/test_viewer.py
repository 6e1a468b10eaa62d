"""`latentmas view`: the offline HTML page, driven in a real headless Chromium (Debian's `chromium`
through playwright), every non-file: request blocked. Values are checked against the file itself
(read back with h5py), pixels against the colormap."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib import colormaps
from matplotlib.image import imread

from capture.format import CaptureReader, CaptureWriter, Handoff, ProblemRecord, Segment
from render.layout import find_gaps
from render.viewer.cli import view_command
from render.viewer.data import decode_float16, encode_handoff
from render.viewer.page import build_page, page_source

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
XSS = "<img src=x onerror=alert(1)>"
SCRIPT_END = "</script><script>alert(2)</script>"
AGENTS = ("planner", "critic", "refiner", "judger")


# -- captures ------------------------------------------------------------------------------------------

def tokens_for(width: int, number: int, index: int) -> list[str]:
    tokens = [f"p{number}h{index}c{j}" for j in range(width)]
    if width > 8:
        tokens[5], tokens[6], tokens[7] = XSS, SCRIPT_END, "a & b \"q\""
    return tokens


def write_capture(path: Path, numbers=(1, 2, 3), num_layers: int = 8, widths=(40, 60, 30), gap_every: int = 0,
                  mode: str = "seed", seed: int = 0, question=None) -> Path:
    """Problems `numbers`, each with hand-offs planner->critic->refiner->judger of T = widths[i]; values
    uniform in [-1, 1] (attention: [0, 0.2]) as float32; a few NaN; kNN gaps every `gap_every` columns."""
    rng = np.random.default_rng(seed)
    attrs = {"model_name": "toy/model", "method": "latent_mas", "similarity": mode, "num_layers": num_layers}
    with CaptureWriter.open(path, attrs, {"seed": seed}, num_layers, dtype="float32", overwrite=True) as writer:
        for number in numbers:
            handoffs = []
            for i, width in enumerate(widths):
                values = rng.uniform(0, 0.2, (num_layers, width)) if "attention" in mode \
                    else rng.uniform(-1, 1, (num_layers, width))
                if width > 3:
                    values[0, 3] = np.nan
                positions = np.arange(width, dtype=np.int64)
                if gap_every:
                    positions = positions + positions // gap_every * 3
                half = width // 2
                segments = [Segment(AGENTS[i], "prompt", 0, half), Segment(AGENTS[i], "latent", half, width)]
                handoffs.append(Handoff(AGENTS[i], AGENTS[i + 1], values, positions, tokens_for(width, number, i),
                                        segments))
            writer.append(ProblemRecord(number, question or f"question {number} <b>bold</b>", f"gold{number}",
                                        f"pred{number}", number % 2 == 0, handoffs))
        writer.finish("2025-01-01T00:00:00", {})
    return path


def file_values(path: Path, number: int, index: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """[num_layers, T] values, tokens and positions of hand-off `index` of problem `number`, read with h5py."""
    with h5py.File(path, "r") as f:
        row = list(f["problems/number"][:]).index(number)
        handoff = int(f["problems/first_handoff"][row]) + index
        first, width = int(f["handoffs/first_column"][handoff]), int(f["handoffs/num_columns"][handoff])
        values = f["columns/layer_similarities"][:, first:first + width].astype(np.float64)
        tokens = [t.decode() if isinstance(t, bytes) else t for t in f["columns/token"][first:first + width]]
        positions = f["columns/position"][first:first + width]
    return values, tokens, positions


def write_page(capture: Path, out: Path, *args) -> Path:
    result = CliRunner().invoke(view_command, [str(capture), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


# -- the browser ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright); the viewer's browser tests need it")
    if CHROMIUM is None:
        pytest.skip("no chromium browser installed (apt-get install -y chromium); the viewer's browser tests need it")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


class Viewer:
    """One page in a fresh browser context; records console errors, dialogs and blocked requests."""

    def __init__(self, browser, path: Path):
        self.context = browser.new_context(viewport={"width": 1300, "height": 900})
        self.errors, self.dialogs, self.blocked = [], [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.goto(path.resolve().as_uri())
        self.page.evaluate("window.latentmasViewer.ready")

    def _route(self, route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def api(self, expression: str, arg=None):
        return self.page.evaluate(f"(arg) => window.latentmasViewer.{expression}", arg)

    def hover(self, layer: int, column: int) -> dict:
        """Move the mouse onto a cell; the tooltip's fields."""
        centre = self.api("cellCenter(arg[0], arg[1])", [layer, column])
        assert centre is not None, f"cell ({layer}, {column}) is not in view"
        self.page.mouse.move(centre["x"], centre["y"])
        tip = self.page.locator("#lm-tooltip")
        assert tip.is_visible()
        return {"where": tip.locator(".where").text_content(), "value": tip.locator(".value").text_content(),
                "token": tip.locator(".tok.here").text_content(), "segment": tip.locator(".segment").text_content(),
                "text": tip.text_content()}

    def pixel(self, x: float, y: float) -> list[int]:
        """RGB on screen at client coordinates (a one-pixel screenshot, so what a person sees)."""
        png = self.page.screenshot(clip={"x": int(x), "y": int(y), "width": 1, "height": 1})
        return [int(v) for v in np.rint(imread(io.BytesIO(png), format="png")[0, 0, :3] * 255)]

    def close(self):
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.blocked == [], f"the page asked the network for {self.blocked}"
        self.context.close()


@pytest.fixture
def open_viewer(browser):
    opened = []

    def open_(path: Path) -> Viewer:
        viewer = Viewer(browser, path)
        opened.append(viewer)
        return viewer

    yield open_
    for viewer in opened:
        viewer.close()


def expected_rgb(value: float, lo: float, hi: float, cmap: str = "RdYlGn") -> np.ndarray:
    index = int(np.clip(np.floor((value - lo) * 255 / (hi - lo) + 0.5), 0, 255))
    return np.rint(colormaps[cmap](np.linspace(0, 1, 256))[index, :3] * 255)


# -- tests in the browser ----------------------------------------------------------------------------------------

def test_hover_shows_the_token_and_the_files_value(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5")
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    selection = viewer.api("selection")
    assert (selection["problem"], selection["handoff"], selection["name"]) == (1, 0, "planner_to_critic")
    values, tokens, positions = file_values(capture, 1, 0)
    for layer, column in [(2, 9), (7, 0), (0, 39), (4, 20)]:
        tip = viewer.hover(layer, column)
        assert tip["where"] == f"layer {layer} · column {column} · position {positions[column]}"
        assert tip["token"] == tokens[column]
        assert abs(float(tip["value"].split()[-1]) - values[layer, column]) <= 1e-3
        assert tip["segment"].startswith("segment planner prompt" if column < 20 else "segment planner latent")
    # every cell through the API equals the file to float16 precision
    got = np.array(viewer.page.evaluate("""() => { const v = window.latentmasViewer, s = v.selection, out = [];
        for (let l = 0; l < s.numLayers; l++) { const row = []; for (let c = 0; c < s.numColumns; c++) row.push(v.cellAt(l, c).value); out.push(row); }
        return out; }"""), dtype=np.float64)
    np.testing.assert_allclose(got, values, atol=2.5e-4, rtol=0)
    nan_cell = viewer.api("cellAt(0, 3)")
    assert nan_cell["value"] is None or np.isnan(nan_cell["value"])  # NaN crosses as null
    assert viewer.hover(0, 3)["value"] == "value NaN"
    cell = viewer.api("cellAt(5, 25)")
    assert cell["token"] == tokens[25] and cell["position"] == positions[25]
    assert cell["segment"] == {"agent": "planner", "kind": "latent", "start": 20, "stop": 40}


def test_markup_in_tokens_and_questions_is_shown_as_text(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5", question=f"Is {XSS} safe? {SCRIPT_END} {{{{script}}}} {{{{meta}}}}")
    page = write_page(capture, tmp_path / "view.html")
    html = page.read_text()
    assert XSS not in html and "alert(2)</script>" not in html  # only escaped inside JSON blocks
    viewer = open_viewer(page)
    for column, token in [(5, XSS), (6, SCRIPT_END), (7, 'a & b "q"')]:
        tip = viewer.hover(3, column)
        assert tip["token"] == token
    assert viewer.page.locator("#lm-question").text_content() == f"Is {XSS} safe? {SCRIPT_END} {{{{script}}}} {{{{meta}}}}"
    assert viewer.page.locator("img").count() == 0
    assert viewer.page.evaluate("document.scripts.length") == 2 + 9  # meta, script, and 9 hand-off blocks
    viewer.page.wait_for_timeout(100)  # an onerror handler would have fired by now
    assert viewer.dialogs == []


def test_switching_problem_and_handoff(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5")
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    page = viewer.page
    # through the page's controls
    page.select_option("#lm-problem", label="2 ✓")
    assert viewer.api("selection")["problem"] == 2
    assert page.locator("#lm-gold").text_content() == "gold2"
    assert page.locator("#lm-prediction").text_content() == "pred2"
    assert page.locator("#lm-correct").text_content().startswith("yes")
    page.select_option("#lm-handoff", index=2)
    selection = viewer.api("selection")
    assert (selection["name"], selection["numColumns"]) == ("refiner_to_judger", 30)
    values, tokens, _ = file_values(capture, 2, 2)
    tip = viewer.hover(6, 11)
    assert tip["token"] == tokens[11] and abs(float(tip["value"].split()[-1]) - values[6, 11]) <= 1e-3
    # through the API, by name and by place
    selection = viewer.page.evaluate("window.latentmasViewer.select(3, 'critic_to_refiner')")
    assert (selection["problem"], selection["handoff"], selection["numColumns"]) == (3, 1, 60)
    values, tokens, _ = file_values(capture, 3, 1)
    assert abs(viewer.api("cellAt(1, 59)")["value"] - values[1, 59]) <= 1e-3
    assert page.locator("#lm-gold").text_content() == "gold3"
    assert page.locator("#lm-correct").text_content().startswith("no")
    with pytest.raises(Exception, match="no problem 9"):
        viewer.page.evaluate("window.latentmasViewer.select(9, 0)")
    # the API object cannot be changed from outside
    assert viewer.page.evaluate("(() => { try { window.latentmasViewer.cellAt = null; } catch (e) {} "
                                "return typeof window.latentmasViewer.cellAt; })()") == "function"


def test_zoom_down_to_single_cells_draws_each_cell_in_its_colour(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5", widths=(5000, 10, 10))
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    values, tokens, _ = file_values(capture, 1, 0)
    assert viewer.api("view") == {"c0": 0, "c1": 5000, "l0": 0, "l1": 8}
    # the mouse wheel zooms around the pointer
    centre = viewer.api("cellCenter(4, 2500)")
    viewer.page.mouse.move(centre["x"], centre["y"])
    for _ in range(3):
        viewer.page.mouse.wheel(0, -300)
    viewer.page.wait_for_timeout(50)
    view = viewer.api("view")
    assert view["c1"] - view["c0"] < 500 and view["c0"] < 2500 < view["c1"]
    # down to four cells: hover and pixels agree with the file
    viewer.page.evaluate("window.latentmasViewer.zoom(4321, 4325, 2, 4)")
    assert viewer.api("view") == {"c0": 4321, "c1": 4325, "l0": 2, "l1": 4}
    for layer, column in [(2, 4321), (3, 4324), (2, 4323)]:
        tip = viewer.hover(layer, column)
        assert tip["token"] == tokens[column]
        assert abs(float(tip["value"].split()[-1]) - values[layer, column]) <= 1e-3
        centre = viewer.api("cellCenter(arg[0], arg[1])", [layer, column])
        got = np.array(viewer.pixel(centre["x"] + 20, centre["y"] + 10))
        np.testing.assert_allclose(got, expected_rgb(values[layer, column], -1, 1), atol=2)
    assert viewer.api("cellCenter(2, 4000)") is None
    # scale and colormap switches recolour the same cell
    centre = viewer.api("cellCenter(3, 4322)")
    viewer.page.select_option("#lm-scale", "layer")
    row = values[3][np.isfinite(values[3])]
    np.testing.assert_allclose(viewer.pixel(centre["x"] + 20, centre["y"] + 10),
                               expected_rgb(values[3, 4322], row.min(), row.max()), atol=2)
    viewer.page.select_option("#lm-cmap", "viridis")
    np.testing.assert_allclose(viewer.pixel(centre["x"] + 20, centre["y"] + 10),
                               expected_rgb(values[3, 4322], row.min(), row.max(), "viridis"), atol=2)
    everything = values[np.isfinite(values)]
    viewer.page.select_option("#lm-scale", "handoff")
    np.testing.assert_allclose(viewer.pixel(centre["x"] + 20, centre["y"] + 10),
                               expected_rgb(values[3, 4322], everything.min(), everything.max(), "viridis"), atol=2)
    # double-click returns to the whole hand-off
    viewer.page.mouse.dblclick(centre["x"], centre["y"])
    viewer.page.wait_for_timeout(50)
    assert viewer.api("view") == {"c0": 0, "c1": 5000, "l0": 0, "l1": 8}


def test_knn_gaps_are_marked(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5", gap_every=7, widths=(40, 20, 20))
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    _, _, positions = file_values(capture, 1, 0)
    expected = [int(c) for c in find_gaps(positions).columns]
    assert expected == [7, 14, 21, 28, 35]
    assert viewer.api("gaps()") == [{"column": c, "removed": 3} for c in expected]
    assert "kNN removed 15 positions in 5 runs" in viewer.page.locator("#lm-caption").text_content()
    tip = viewer.hover(4, 14)
    assert "kNN gap: 3 positions removed before this column" in tip["text"]
    assert "kNN gap" not in viewer.hover(4, 15)["text"]
    # a dark marker under the map at the gap, none half way between gaps
    top = viewer.api("cellCenter(0, 14)")
    left, right = viewer.api("cellCenter(0, 13)"), viewer.api("cellCenter(0, 10)")
    box = viewer.page.locator("#lm-canvas").bounding_box()
    plot_bottom = top["y"] + (top["y"] - viewer.api("cellCenter(1, 14)")["y"]) / 2
    gap_x = (left["x"] + top["x"]) / 2
    assert max(viewer.pixel(gap_x, plot_bottom + 6)) < 60
    assert min(viewer.pixel(right["x"], plot_bottom + 6)) > 200
    assert plot_bottom + 6 < box["y"] + box["height"]


def test_click_shows_the_column_profile_and_the_layer_strip(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5")
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    centre = viewer.api("cellCenter(5, 12)")
    viewer.page.mouse.click(centre["x"], centre["y"])
    assert viewer.page.locator("#lm-profile-title").text_content().startswith("column 12 (position 12")
    assert viewer.page.locator("#lm-strip-title").text_content().startswith("layer 5 over columns 0…39")


def test_attention_mode_uses_its_own_scale(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5", mode="attention")
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    values, _, _ = file_values(capture, 1, 0)
    assert viewer.api("selection")["cmap"] == "viridis"
    viewer.page.evaluate("window.latentmasViewer.zoom(10, 12, 1, 2)")
    centre = viewer.api("cellCenter(1, 11)")
    top = np.nanmax(values)
    np.testing.assert_allclose(viewer.pixel(centre["x"], centre["y"]),
                               expected_rgb(values[1, 11], 0, top, "viridis"), atol=2)


@pytest.mark.slow
def test_a_real_tiny_qwen3_capture_with_knn(workdir, tiny_lm, open_viewer):
    from captures import solve_and_capture, tiny_config
    from conftest import make_problems

    capture = workdir / "captures" / "tiny.h5"
    solve_and_capture(tiny_lm, make_problems()[:1], tiny_config(knn_filter=True, knn_percentage=0.6), capture)
    result = CliRunner().invoke(view_command, [str(capture)])
    assert result.exit_code == 0, result.output
    page = workdir / "charts" / "tiny" / "viewer.html"
    assert f"Wrote the viewer page {Path('charts/tiny/viewer.html')}" in result.output
    viewer = open_viewer(page)
    with CaptureReader(capture) as reader:
        number = reader.problem_numbers[0]
        handoffs = list(reader.handoffs(number))
    assert [h["name"] for h in viewer.api("problems")[0]["handoffs"]] == [h.name for h in handoffs]
    for index, handoff in enumerate(handoffs):
        viewer.page.evaluate("([n, i]) => window.latentmasViewer.select(n, i)", [number, index])
        layer, column = handoff.layer_similarities.shape[0] // 2, handoff.num_columns - 1
        tip = viewer.hover(layer, column)
        assert tip["token"] == handoff.tokens[column].replace("\n", "\\n")
        assert abs(float(tip["value"].split()[-1]) - float(handoff.layer_similarities[layer, column])) <= 1e-3
        assert [g["column"] for g in viewer.api("gaps()")] == [int(c) for c in find_gaps(handoff.positions).columns]
    assert any(len(find_gaps(h.positions)) for h in handoffs), "kNN filtering removed nothing"


# -- page contents and the command (no browser) ---------------------------------------------------------------

def test_page_is_self_contained_and_small(tmp_path):
    capture = write_capture(tmp_path / "big.h5", num_layers=36, widths=(2000, 2000, 2000), gap_every=50)
    page = write_page(capture, tmp_path / "view.html")
    size = page.stat().st_size
    assert size < 5_000_000, f"{size / 1e6:.2f} MB"
    html = page.read_text()
    assert not re.search(r"\b(?:src|href)\s*=", html.split('id="lm-meta"')[0]), "the page links to something"
    assert not re.search(r"https?://|//cdn|@import|url\(", html)
    assert "default-src 'none'" in html  # the page's own policy forbids any fetch


def test_float16_round_trip_is_within_a_quarter_thousandth():
    rng = np.random.default_rng(1)
    values = rng.uniform(-1, 1, (36, 500))
    values[3, 7] = np.nan
    handoff = Handoff("planner", "critic", values, np.arange(500), ["x"] * 500, [])
    encoded = encode_handoff(handoff, "seed")
    back = decode_float16(encoded["values"], 36).astype(np.float64)
    assert np.isnan(back[3, 7])
    np.testing.assert_allclose(back, values, atol=2.5e-4, rtol=0)
    assert (encoded["vmin"], encoded["vmax"]) == (-1.0, 1.0)


def test_selection_options_and_errors(tmp_path):
    capture = write_capture(tmp_path / "run.h5")
    runner = CliRunner()
    out = write_page(capture, tmp_path / "one.html", "--problems", "2", "--transitions", "critic_to_refiner")
    html = out.read_text()
    assert html.count('<script type="application/json" id="lm-h') == 1
    cases = [
        ([str(tmp_path / "missing.h5")], "missing.h5"),
        ([str(capture), "--problems", "7"], "has no problem 7 (it holds 1-3)"),
        ([str(capture), "--problems", "x"], "bad problem spec"),
        ([str(capture), "--transitions", "planner_to_judger"], "has no hand-off planner_to_judger"),
        ([str(capture), "--cmap", "viridi"], "did you mean viridis"),
    ]
    for args, message in cases:
        result = runner.invoke(view_command, [*args, "--out", str(tmp_path / "x.html")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]


def test_default_out_is_per_capture_and_never_overwrites_another_runs_page(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = write_capture(tmp_path / "a" / "run.h5", seed=1)
    second = write_capture(tmp_path / "b" / "run.h5", seed=2)
    runner = CliRunner()
    for capture in (first, second, first):
        assert runner.invoke(view_command, [str(capture)]).exit_code == 0
    pages = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("charts/*/viewer.html"))
    assert pages == ["charts/run/viewer.html", "charts/run_2/viewer.html"]
    assert page_source(tmp_path / "charts/run/viewer.html") == str(first.resolve())
    assert page_source(tmp_path / "charts/run_2/viewer.html") == str(second.resolve())


def test_latentmas_view_is_a_subcommand(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "latentmas", "view", str(capture), "--out", str(tmp_path / "v.html")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Wrote the viewer page" in done.stdout and (tmp_path / "v.html").stat().st_size > 1000
    with CaptureReader(capture) as reader:
        assert build_page(reader) == (tmp_path / "v.html").read_text()


def test_an_empty_handoff_says_so(tmp_path, open_viewer):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(0, 10, 10))
    viewer = open_viewer(write_page(capture, tmp_path / "view.html"))
    assert viewer.api("selection")["numColumns"] == 0
    assert "× 0 columns" in viewer.page.locator("#lm-caption").text_content()
    with pytest.raises(Exception, match="no cell"):
        viewer.api("cellAt(0, 0)")
    viewer.page.evaluate("window.latentmasViewer.select(1, 1)")
    assert viewer.api("cellAt(0, 9)")["token"] == tokens_for(10, 1, 1)[9]
