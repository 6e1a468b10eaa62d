"""The layering and the registries: what issue #13 promises a newcomer.

- the system (`latentmas` outside `latentmas.app`) imports nothing from `capture` or `render`,
  neither at run time nor in its source;
- `render` imports with torch, transformers and `latentmas` unavailable;
- a similarity mode and a figure kind defined here, in the test only, are captured and drawn
  through the real CLI: registering them is all it takes.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
APP_LAYER = ("latentmas.app", "latentmas.__main__")


def _modules(package: str) -> list[str]:
    folder = ROOT / package.replace(".", "/")
    names = [package]
    for info in pkgutil.walk_packages([str(folder)], prefix=f"{package}."):
        names.append(info.name)
    return names


def system_modules() -> list[str]:
    return [m for m in _modules("latentmas") if not m.startswith(APP_LAYER)]


def _blocked_import(modules: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    """Import `modules` in a fresh interpreter where importing any of `blocked` fails."""
    code = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
            f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\nprint('ok')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_system_imports_without_capture_and_render():
    done = _blocked_import(system_modules(), ["capture", "render"])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_no_system_source_imports_capture_or_render():
    edges = []
    for module in system_modules():
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            edges += [(module, n) for n in names if n.split(".")[0] in ("capture", "render")]
    assert edges == []


def test_render_imports_without_torch_transformers_and_latentmas():
    modules = [m for m in _modules("render") if m != "render.__main__"] + ["capture.format", "capture.selection"]
    done = _blocked_import(modules, ["torch", "transformers", "latentmas"])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# -- a toy mode and a toy figure kind, registered here only ---------------------------------

@pytest.fixture
def toy_registrations():
    """A hand-off similarity mode 'toy' (key norms, 0 ... 50) and a figure kind 'toy' (column means)."""
    import torch

    from latentmas.similarity import HandoffMode
    from latentmas.similarity import unregister as unregister_mode
    from render.kinds import FigureKind
    from render.kinds import unregister as unregister_kind

    drawn = []

    class KeyNorms(HandoffMode):
        name = "toy"
        description = "the norm of each head-averaged cached key"
        label = "key norm"
        value_range = (0.0, 50.0)
        default_cmap = "magma"

        def score(self, keys, query):
            return torch.stack([k.float().mean(dim=1).norm(dim=-1) for k in keys], dim=1)

    class ColumnMeans(FigureKind):
        name = "toy"
        prefix = "toy_"

        def draw(self, handoff, *, title, mode, cmap, options, notes=()):
            from matplotlib.figure import Figure

            drawn.append((handoff.name, mode))
            fig = Figure(figsize=(4, 2), dpi=options.dpi)
            fig.add_subplot().plot(np.nanmean(handoff.layer_similarities, axis=0))
            return fig

    try:
        yield drawn
    finally:
        unregister_mode("toy")
        unregister_kind("toy")


def test_a_mode_and_a_kind_registered_in_a_test_capture_and_draw_through_the_cli(workdir, toy_registrations):
    from capture.format import CaptureReader
    from latentmas.app.cli import main

    runner = CliRunner()
    captured = runner.invoke(main, ["capture", "--max_samples", "2", "--max_new_tokens", "4", "--device", "cpu",
                                    "--latent_steps", "2", "--similarity", "toy", "--capture_file", "toy.h5"])
    assert captured.exit_code == 0, captured.output
    with CaptureReader("toy.h5") as reader:
        assert reader.attrs["similarity"] == "toy" and reader.attrs["similarity_label"] == "key norm"
        assert (reader.attrs["similarity_min"], reader.attrs["similarity_max"]) == (0.0, 50.0)
        handoff = next(iter(reader.handoffs(1)))
        assert handoff.layer_similarities.min() > 0  # norms, not cosines
    drawn = runner.invoke(main, ["render", "toy.h5", "--kind", "toy,multi", "--out", "figs", "--no-progress"])
    assert drawn.exit_code == 0, drawn.output
    assert sorted(p.name for p in Path("figs").glob("toy_*.png")) == sorted(
        f"toy_{name}_problem{n}.png" for n in (1, 2)
        for name in ("planner_to_critic", "critic_to_refiner", "refiner_to_judger"))
    assert len(list(Path("figs").glob("heatmap_*.png"))) == 6
    name, mode = toy_registrations[0]
    assert (mode.name, mode.label, mode.low, mode.high, mode.cmap) == ("toy", "key norm", 0.0, 50.0, "magma")


def test_a_view_only_rerun_keeps_the_run_statistics(workdir):
    from latentmas.app.cli import run_command

    args = ["--max_samples", "2", "--max_new_tokens", "6", "--device", "cpu", "--latent_steps", "2",
            "--capture_file", "run.h5"]
    first = CliRunner().invoke(run_command, args)
    assert first.exit_code == 0, first.output
    summary_file = next(Path("runs").glob("*/summary.json"))
    before = json.loads(summary_file.read_text())
    again = CliRunner().invoke(run_command, [*args, "--show_heatmaps_singlelayer", "--out", "charts"])
    assert again.exit_code == 0, again.output
    after = json.loads(summary_file.read_text())
    for key in ("total", "correct", "accuracy", "total_time_sec", "time_per_sample_sec", "generated_tokens"):
        assert after[key] == before[key], key
    assert before["generated_tokens"] > 0 and after["resumed_problems"] == 2
    assert len(list(Path("charts").glob("heatmap_singlelayer_*.png"))) == 6


def test_cli_conventions(workdir):
    from latentmas.app.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.startswith("latentmas ")
    help_text = runner.invoke(main, ["capture", "-h"]).output
    assert "--max_samples" in help_text and "--max-samples" not in help_text
    assert "--method [latent_mas]" in help_text and "baseline|" not in help_text
    for title in ("Model:", "Method:", "kNN filtering:", "Capture:", "Output:", "Benchmark-only:"):
        assert title in help_text
    refused = runner.invoke(main, ["run", "--temperature", "inf", "--device", "cpu"])
    assert refused.exit_code == 2 and "not a finite number" in refused.output
    dashed = runner.invoke(main, ["run", "--max-samples", "1", "--max_new_tokens", "2", "--latent-steps", "1",
                                  "--device", "cpu"])
    assert dashed.exit_code == 0, dashed.output
    last = [line for line in dashed.output.splitlines() if "{" in line][-1]  # after the progress bar's \r
    assert json.loads(last[last.index("{"):])["total"] == 1
