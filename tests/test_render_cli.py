"""`render` / `info` commands: options, bad input as one-line errors, no torch needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from test_render import write_capture  # the synthetic-capture helper (pytest puts tests/ on sys.path)

from render.cli import info_command, main, render_command

REPO = Path(__file__).resolve().parents[1]


def run(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return result


def assert_clean_error(result, *fragments, code=1):
    assert result.exit_code == code, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], result.output


@pytest.fixture()
def capture(tmp_path):
    return write_capture(tmp_path / "run.h5", numbers=(1, 2, 3))


# -- rendering ----------------------------------------------------------------------------------

def test_render_writes_both_kinds_and_reports(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "charts", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"Wrote 18 figures to {tmp_path / 'charts'}" in result.output
    assert len(list((tmp_path / "charts").glob("heatmap_singlelayer_*_problem*.png"))) == 9


def test_rerender_with_another_cmap_and_options(capture, tmp_path):
    out = tmp_path / "charts"
    result = run(render_command, capture, "--out", out, "--cmap", "viridis", "--kind", "multi", "--problems",
                 "2-3", "--transitions", "planner_to_critic,refiner_to_judger", "--dpi", "60", "--format", "svg",
                 "--vmin", "-0.5", "--vmax", "0.5", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap_planner_to_critic_problem2.svg", "heatmap_planner_to_critic_problem3.svg",
        "heatmap_refiner_to_judger_problem2.svg", "heatmap_refiner_to_judger_problem3.svg"]


def test_python_dash_m_render_group_has_both_commands():
    assert set(main.commands) == {"render", "info"}
    result = run(main, "--help")
    assert result.exit_code == 0 and "render" in result.output and "info" in result.output


def test_several_captures_get_one_folder_each(tmp_path):
    a = write_capture(tmp_path / "a.h5", numbers=(1,))
    b = write_capture(tmp_path / "b.h5", numbers=(1,))
    result = run(render_command, a, b, "--out", tmp_path / "charts", "--kind", "single", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Wrote 6 figures" in result.output
    assert len(list((tmp_path / "charts" / "a").iterdir())) == 3
    assert len(list((tmp_path / "charts" / "b").iterdir())) == 3


def test_token_labels_notice_is_one_line(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(10, 400))
    result = run(render_command, capture, "--out", tmp_path / "charts", "--token-labels", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sum("--token-labels" in line for line in result.output.splitlines()) == 1


# -- bad input: one line, no traceback --------------------------------------------------------------

def test_missing_file(tmp_path):
    result = run(render_command, tmp_path / "nope.h5", "--out", tmp_path / "charts")
    assert_clean_error(result, "not found", "nope.h5")


def test_not_hdf5(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("just some text\n")
    assert_clean_error(run(render_command, text, "--out", tmp_path / "charts"), "is not an HDF5 file")
    assert_clean_error(run(info_command, text), "is not an HDF5 file")


def test_truncated_file(capture, tmp_path):
    cut = tmp_path / "cut.h5"
    shutil.copy(capture, cut)
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(size // 2)
    assert_clean_error(run(render_command, cut, "--out", tmp_path / "charts"), "cut.h5")
    assert_clean_error(run(info_command, cut), "cut.h5")


def test_unknown_schema_version(capture, tmp_path):
    with h5py.File(capture, "r+") as f:
        f.attrs["schema_version"] = 99
    assert_clean_error(run(render_command, capture, "--out", tmp_path / "charts"), "schema 99")
    assert_clean_error(run(info_command, capture), "schema 99")


def test_not_a_capture(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = [1, 2, 3]
    assert_clean_error(run(render_command, path, "--out", tmp_path / "charts"), "not a LatentMAS capture")


def test_empty_handoff_renders_a_message_figure(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(0, 8))
    result = run(render_command, capture, "--out", tmp_path / "charts", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "charts" / "heatmap_planner_to_critic_problem1.png").exists()


def test_nan_matrix_renders(tmp_path):
    import numpy as np

    def with_nan(i, num_layers, width):
        values = np.zeros((num_layers, width))
        values[:, ::3] = np.nan
        return values

    capture = write_capture(tmp_path / "run.h5", numbers=(1,), matrix=with_nan)
    result = run(render_command, capture, "--out", tmp_path / "charts", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Wrote 6 figures" in result.output


def test_all_nan_matrix_renders(tmp_path):
    import numpy as np

    capture = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(5,),
                            matrix=lambda i, n, t: np.full((n, t), np.nan))
    result = run(render_command, capture, "--out", tmp_path / "charts", "--no-progress")
    assert result.exit_code == 0, result.output


def test_unknown_colormap_suggests_close_names(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "charts", "--cmap", "RdYlGnn")
    assert_clean_error(result, "unknown colormap 'RdYlGnn'", "RdYlGn", code=2)
    result = run(render_command, capture, "--out", tmp_path / "charts", "--single-cmap", "ylorrd")
    assert_clean_error(result, "YlOrRd", code=2)
    assert not (tmp_path / "charts").exists()


@pytest.mark.parametrize("spec", ["x", "5-1", "1,,2", "1-"])
def test_bad_problem_spec(capture, tmp_path, spec):
    result = run(render_command, capture, "--out", tmp_path / "charts", "--problems", spec)
    assert_clean_error(result, "--problems", code=2)


def test_unknown_transition_suggests(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "charts", "--transitions", "planner_to_critc")
    assert_clean_error(result, "planner_to_critic")


def test_absent_problems_warn_but_render_the_rest(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "charts", "--problems", "3-9", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "no problem 4-9" in result.output and "Wrote 6 figures" in result.output


def test_vmin_above_vmax(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "charts", "--vmin", "1", "--vmax", "0")
    assert_clean_error(result, "--vmin", code=2)


def test_capture_whose_writer_was_killed_renders_what_was_committed(tmp_path):
    """A writer killed with SIGKILL mid-run: render and info read the committed problems."""
    path = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        import numpy as np
        from capture.format import CaptureWriter, ProblemRecord
        from test_render import make_handoffs
        writer = CaptureWriter.open({str(path)!r}, {{"similarity": "seed"}}, {{}}, 4)
        rng = np.random.default_rng(0)
        for n in (1, 2):
            writer.append(ProblemRecord(n, "q", "1", "1", True, make_handoffs(n, 4, (5, 7, 9), rng)))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    result = run(info_command, path)
    assert result.exit_code == 0, result.output
    assert "still running, or stopped early" in result.output
    result = run(render_command, path, "--out", tmp_path / "charts", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Wrote 12 figures" in result.output


# -- info -----------------------------------------------------------------------------------------

def test_info_prints_metadata_and_problem_table(capture):
    result = run(info_command, capture)
    assert result.exit_code == 0, result.output
    out = result.output
    for fragment in ("toy/model", "latent_mas", "6 (float32 similarities)", "seed", "latent steps",
                     "knn_filter=False", "2025-01-01T00:00:00", "3 committed", "hand-offs (T)"):
        assert fragment in out, fragment
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[1][1:4] == ["2", "2", "yes"]
    assert "planner_to_critic 12, critic_to_refiner 20, refiner_to_judger 28" in out


# -- no torch ------------------------------------------------------------------------------------

def test_render_runs_with_torch_and_transformers_unimportable(capture, tmp_path):
    """`python -m render render` in a subprocess whose `import torch` / `import transformers` fail."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    sys.stderr.write("BLOCKED-IMPORT " + name + "\\n")
                    raise ImportError(name + " is blocked in this test")
                return None
        sys.meta_path.insert(0, _Block())
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the blocker works
    out = tmp_path / "charts"
    proc = subprocess.run(
        [sys.executable, "-m", "render", "render", str(capture), "--out", str(out), "--jobs", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "BLOCKED-IMPORT" not in proc.stderr
    assert len(list(out.glob("*.png"))) == 18
    info = subprocess.run([sys.executable, "-m", "render", "info", str(capture)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert info.returncode == 0 and "hand-offs (T)" in info.stdout, info.stderr


# -- output folders and the x axis ----------------------------------------------------------------

def test_without_out_figures_go_to_a_folder_named_after_the_capture(tmp_path, monkeypatch):
    knn_off = write_capture(tmp_path / "knn_off.h5", numbers=(1,))
    knn_on = write_capture(tmp_path / "knn_on.h5", numbers=(1,), gap_every=5)
    monkeypatch.chdir(tmp_path)
    for capture in (knn_off, knn_on):
        result = run(render_command, capture, "--kind", "multi", "--no-progress")
        assert result.exit_code == 0, result.output
        assert f"to {Path('charts') / capture.stem}" in result.output
    for stem in ("knn_off", "knn_on"):  # same file names, two folders: nothing overwritten
        assert sorted(p.name for p in (tmp_path / "charts" / stem).glob("*.png")) == [
            "heatmap_critic_to_refiner_problem1.png", "heatmap_planner_to_critic_problem1.png",
            "heatmap_refiner_to_judger_problem1.png"]
    assert not list((tmp_path / "charts").glob("*.png"))
    assert json.loads((tmp_path / "charts" / "knn_on" / "rendered_from.json").read_text()) == {
        "capture": str(knn_on.resolve())}


def test_explicit_out_is_used_as_given(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "mine", "--kind", "single", "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "mine").glob("heatmap_singlelayer_*.png"))) == 9


def test_x_axis_option(capture, tmp_path):
    result = run(render_command, capture, "--out", tmp_path / "pos", "--x-axis", "position", "--problems", "1",
                 "--no-progress")
    assert result.exit_code == 0 and "Wrote 6 figures" in result.output, result.output
    result = run(render_command, capture, "--out", tmp_path / "bad", "--x-axis", "layer")
    assert result.exit_code == 2 and "'layer' is not one of 'column', 'position'" in result.output, result.output


def test_same_file_name_from_another_folder_gets_its_own_default_folder(tmp_path, monkeypatch):
    first = write_capture(tmp_path / "a" / "run.h5", numbers=(1,))
    second = write_capture(tmp_path / "b" / "run.h5", numbers=(1,), seed=1)
    monkeypatch.chdir(tmp_path)
    for capture, folder in ((first, "run"), (second, "run_2"), (first, "run"), (second, "run_2")):
        result = run(render_command, capture, "--kind", "single", "--no-progress")
        assert result.exit_code == 0 and f"to {Path('charts') / folder}" in result.output, result.output
    assert not (tmp_path / "charts" / "run_3").exists()
    result = run(render_command, first, second, "--kind", "single", "--no-progress")
    assert result.exit_code == 0 and "Wrote 6 figures to charts/<capture>/" in result.output, result.output
