"""How fast the `latentmas view` page is in headless Chromium (Debian's chromium through playwright).

    python bench/viewer_speed.py [--repeats 5] [--screenshots DIR]

For synthetic captures of 3 problems x 3 hand-offs x 36 layers x T columns (T = 2,000 and 32,768,
float16, kNN gaps every 97 columns) it writes the page and measures, as medians over --repeats
fresh page loads:
  page MB         size of the HTML file;
  first draw      navigation start -> first hand-off drawn (the page's own performance.now());
  hover           mousemove dispatched -> tooltip filled, plus the next frame painted;
  switch          select(next hand-off) -> drawn and the next frame painted (first and cached);
  zoom/pan fps    frames per second of 120 successive view changes, each drawn and awaited with
                  requestAnimationFrame at T = 32,768, zoomed to 1/8 of the columns and to the whole;
Targets (issue 17): first draw <= 1 s (2,000) and <= 3 s (32,768), hover <= 50 ms, switch <= 300 ms,
zoom/pan >= 30 frames/s.

With --plotly FILE (plotly.min.js, e.g. from the `plotly` wheel's package_data) it also times the
candidate library on the same data: one heatmap trace of [36, T], Plotly.newPlot until drawn, and
Plotly.relayout of the x range (zoom/pan) per frame.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.format import CaptureReader, CaptureWriter, Handoff, ProblemRecord, Segment
from render.viewer.page import build_page, write_page

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
AGENTS = ("planner", "critic", "refiner", "judger")


def synthetic_capture(path: Path, num_layers: int, width: int, problems: int = 3, seed: int = 0) -> Path:
    """Smooth-ish random fields (like real maps: structure along layers and columns), float16."""
    rng = np.random.default_rng(seed)
    with CaptureWriter.open(path, {"similarity": "seed", "model_name": "synthetic"}, {"w": width}, num_layers,
                            dtype="float16", overwrite=True) as writer:
        for number in range(1, problems + 1):
            handoffs = []
            for i in range(3):
                columns = np.arange(width)[None, :]
                waves = np.sin(columns / 180.0 + rng.uniform(0, 6)) + 0.5 * np.sin(columns / 23.0 + rng.uniform(0, 6))
                layers = np.linspace(0.2, 1.0, num_layers)[:, None]
                values = np.tanh(0.9 * waves * layers + rng.normal(0, 0.25, (num_layers, width)))
                positions = np.arange(width) + np.arange(width) // 97 * 2
                third = width // 3
                segments = [Segment(AGENTS[j], kind, a, b) for j, (kind, a, b) in
                            enumerate([("prompt", 0, third), ("latent", third, 2 * third), ("prompt", 2 * third, width)])]
                tokens = [f"tok{j}" if j % 5 else "<latent>" for j in range(width)]
                handoffs.append(Handoff(AGENTS[i], AGENTS[i + 1], values, positions, tokens, segments))
            writer.append(ProblemRecord(number, f"synthetic question {number}", "1", "1", True, handoffs))
        writer.finish("now", {})
    return path


HOVER_JS = """async () => {
  const v = window.latentmasViewer, c = document.getElementById('lm-canvas'), tip = document.getElementById('lm-tooltip');
  const times = [];
  for (let k = 0; k < 20; k++) {
    const col = Math.floor((k + 0.5) / 20 * v.selection.numColumns), p = v.cellCenter(17, col);
    const t0 = performance.now();
    c.dispatchEvent(new PointerEvent('pointermove', {clientX: p.x, clientY: p.y, bubbles: true}));
    if (tip.hidden || Number(tip.dataset.column) !== col) throw new Error('tooltip did not follow');
    await new Promise((r) => requestAnimationFrame(() => r()));
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  return times[times.length >> 1];
}"""

SWITCH_JS = """async () => {
  const v = window.latentmasViewer, out = [];
  for (const [p, h] of [[1, 1], [1, 2], [2, 0], [1, 1]]) {   // three new hand-offs, then one decoded before
    const t0 = performance.now();
    await v.select(p, h);
    out.push(performance.now() - t0);
  }
  return out;
}"""

PAN_JS = """async ([fraction]) => {
  const v = window.latentmasViewer, T = v.selection.numColumns, w = T * fraction;
  await v.zoom(0, w);
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const draws = [];
  await frame();
  const t0 = performance.now();
  for (let k = 0; k < 120; k++) {
    const c0 = (T - w) * (k / 119);
    draws.push(await v.zoom(c0, c0 + w * (1 - 0.3 * Math.sin(k / 10))).then(() => v.stats.lastDrawMs));
  }
  const fps = 120 / ((performance.now() - t0) / 1000);
  draws.sort((a, b) => a - b);
  return {fps, drawMs: draws[draws.length >> 1]};
}"""


PLOTLY_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script>{plotly}</script></head><body>
<div id="p" style="width:1300px;height:500px"></div>
<script type="application/json" id="d">{data}</script>
<script>
window.timings = (async () => {{
  const d = JSON.parse(document.getElementById('d').textContent), bin = atob(d.values);
  const bytes = new Uint8Array(bin.length); for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const h = new Uint16Array(bytes.buffer), T = h.length / d.L, z = [];
  const f = (x) => {{ const s = x & 0x8000 ? -1 : 1, e = (x >> 10) & 31, m = x & 1023;
    return e === 0 ? s * m * 2 ** -24 : e === 31 ? NaN : s * (1 + m / 1024) * 2 ** (e - 15); }};
  for (let l = 0; l < d.L; l++) {{ const row = new Float32Array(T); for (let c = 0; c < T; c++) row[c] = f(h[l * T + c]); z.push(Array.from(row)); }}
  const t0 = performance.now();
  await Plotly.newPlot('p', [{{type: 'heatmap', z, colorscale: 'RdYlGn', zmin: -1, zmax: 1}}], {{margin: {{t: 10}}}});
  await new Promise((r) => requestAnimationFrame(() => r()));
  const plotted = performance.now();
  const t1 = performance.now();
  for (let k = 0; k < 30; k++) {{
    const c0 = (T - T / 8) * k / 29;
    await Plotly.relayout('p', {{'xaxis.range': [c0, c0 + T / 8]}});
    await new Promise((r) => requestAnimationFrame(() => r()));
  }}
  return {{newPlotMs: plotted - t0, firstDrawMs: plotted, fps: 30 / ((performance.now() - t1) / 1000)}};
}})();
</script></body></html>"""


def measure_plotly(browser, plotly_js: Path, capture: Path, folder: Path) -> dict:
    from render.viewer.data import encode_float16, script_json

    with CaptureReader(capture) as reader:
        handoff = next(reader.handoffs(reader.problem_numbers[0]))
    data = script_json({"L": int(handoff.layer_similarities.shape[0]), "values": encode_float16(handoff.layer_similarities)})
    page_path = folder / f"plotly_{handoff.num_columns}.html"
    page_path.write_text(PLOTLY_PAGE.format(plotly=plotly_js.read_text(encoding="utf-8"), data=data), encoding="utf-8")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(page_path.as_uri())
    result = page.evaluate("window.timings")
    result["page MB"] = page_path.stat().st_size / 1e6
    result["library MB"] = plotly_js.stat().st_size / 1e6
    context.close()
    return result


def measure(browser, page_path: Path, screenshot: Path | None) -> dict:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.resolve().as_uri())
    page.evaluate("window.latentmasViewer.ready")
    result = {"first draw ms": page.evaluate("window.latentmasViewer.stats.firstDrawMs")}
    if screenshot is not None:
        centre = page.evaluate("window.latentmasViewer.cellCenter(20, Math.floor(window.latentmasViewer.selection.numColumns * 0.62))")
        page.mouse.move(centre["x"], centre["y"])
        page.screenshot(path=str(screenshot))
        page.mouse.move(0, 0)
    result["hover ms"] = page.evaluate(HOVER_JS)
    switches = page.evaluate(SWITCH_JS)
    result["switch ms (new)"] = statistics.median(switches[:3])
    result["switch ms (cached)"] = switches[3]
    for fraction in (1 / 8, 1.0):
        pan = page.evaluate(PAN_JS, [fraction])
        result[f"zoom/pan fps @1/{round(1 / fraction)}"] = pan["fps"]
        result[f"draw ms @1/{round(1 / fraction)}"] = pan["drawMs"]
    if screenshot is not None:
        page.evaluate("window.latentmasViewer.select(1, 0)")
        t = page.evaluate("window.latentmasViewer.selection.numColumns")
        page.evaluate(f"window.latentmasViewer.zoom({t // 2}, {t // 2 + 24}, 12, 24)")
        centre = page.evaluate(f"window.latentmasViewer.cellCenter(18, {t // 2 + 11})")
        page.mouse.move(centre["x"], centre["y"])
        page.screenshot(path=str(screenshot.with_name(screenshot.stem + "_zoomed.png")))
    context.close()
    if errors:
        raise SystemExit(f"page errors: {errors}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--widths", default="2000,32768")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for PNG screenshots")
    parser.add_argument("--plotly", type=Path, default=None, help="plotly.min.js to time as the alternative")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        print(f"headless {browser.version}, 3 problems x 3 hand-offs x 36 layers, medians of {args.repeats} loads")
        for width in [int(w) for w in args.widths.split(",")]:
            capture = synthetic_capture(Path(tmp) / f"w{width}.h5", 36, width)
            t0 = time.perf_counter()
            with CaptureReader(capture) as reader:
                text = build_page(reader)
            build_s = time.perf_counter() - t0
            page_path = Path(tmp) / f"w{width}.html"
            write_page(text, page_path)
            runs = [measure(browser, page_path, args.screenshots / f"viewer_36x{width}.png"
                            if args.screenshots and i == 0 else None) for i in range(args.repeats)]
            print(f"\n36 x {width}: page {page_path.stat().st_size / 1e6:.2f} MB, written in {build_s:.2f} s")
            for key in runs[0]:
                values = [r[key] for r in runs]
                print(f"  {key:24s} {statistics.median(values):8.1f}   (min {min(values):.1f}, max {max(values):.1f})")
            if args.plotly is not None:
                plotly = measure_plotly(browser, args.plotly, capture, Path(tmp))
                print(f"  plotly.js, one hand-off: library {plotly['library MB']:.2f} MB, page {plotly['page MB']:.2f} MB, "
                      f"newPlot {plotly['newPlotMs']:.0f} ms, first draw {plotly['firstDrawMs']:.0f} ms after "
                      f"navigation, relayout zoom/pan {plotly['fps']:.1f} frames/s")
        browser.close()


if __name__ == "__main__":
    main()
