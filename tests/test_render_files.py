"""Figure files: the failure count, agents whose names clash once sanitised, temporary files of their own."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from test_render import write_capture  # the synthetic-capture helper (pytest puts tests/ on sys.path)

import render.batch
from capture.format import CaptureWriter, Handoff, ProblemRecord, Segment
from render.batch import RenderError, figure_filename, problem_filenames, render_capture


def _capture_with_agents(path: Path, pairs: list[tuple[str, str]], numbers=(1,)) -> Path:
    """One problem per number whose hand-offs go between the agent names of `pairs`, each with its own values."""
    with CaptureWriter.open(path, {"model_name": "m", "method": "latent_mas", "similarity": "seed"}, {"a": 1}, 3,
                            dtype="float32", overwrite=True) as writer:
        for number in numbers:
            handoffs = []
            for i, (source, target) in enumerate(pairs):
                width = 4 + i
                values = np.full((3, width), (i + 1) / (len(pairs) + 1))
                handoffs.append(Handoff(source, target, values, np.arange(width), [f"t{j}" for j in range(width)],
                                        [Segment(source, "prompt", 0, width)]))
            writer.append(ProblemRecord(number, f"q{number}", "1", "1", True, handoffs))
    return path


# -- "N of M problems could not be fully rendered" counts problems ---------------------------------------------

def _failing_figure(fail_problems):
    real = render.batch.build_figure

    def build(kind, handoff, problem, *args, **kwargs):
        if problem in fail_problems:
            raise RuntimeError(f"cannot draw problem {problem}")
        return real(kind, handoff, problem, *args, **kwargs)
    return build


@pytest.mark.parametrize("failing, expected", [({1, 2, 3}, "3 of 3 problems"), ({2}, "1 of 3 problems")])
def test_failure_message_counts_problems_not_figures(tmp_path, monkeypatch, failing, expected):
    capture = write_capture(tmp_path / "run.h5", numbers=(1, 2, 3))  # 3 hand-offs x 2 kinds each
    monkeypatch.setattr(render.batch, "build_figure", _failing_figure(failing))
    with pytest.raises(RenderError) as caught:
        render_capture(capture, tmp_path / "out", progress=False)
    message = str(caught.value)
    errors = 3 * len(failing)  # a hand-off's first kind fails, the rest of that hand-off is skipped
    assert message.startswith(f"{expected} could not be fully rendered: problem {min(failing)} planner_to_critic")
    assert message.endswith(f"(and {errors - 1} more errors)")
    assert "\n" not in message
    assert len(caught.value.written) == 6 * (3 - len(failing))


# -- agents whose sanitised names clash -------------------------------------------------------------------------

CLASHING = [("a/b", "c"), ("a b", "c"), ("a-b", "c"), ("A-b", "c"), ("singlelayer_x", "y"), ("x", "y"),
            ("a-b", "c")]  # the last: the same hand-off again in the problem


def test_clashing_agent_names_get_files_of_their_own(tmp_path):
    capture = _capture_with_agents(tmp_path / "run.h5", CLASHING, numbers=(1, 2))
    written = render_capture(capture, tmp_path / "out", kinds=("multi", "single"), progress=False)
    assert len(written) == len(CLASHING) * 2 * 2
    names = [p.name for p in written]
    assert len({n.casefold() for n in names}) == len(names), sorted(names)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    # names the sanitiser leaves alone keep the reference naming; a clashing one carries a digest tag
    for problem in (1, 2):
        assert f"heatmap_a-b_to_c_problem{problem}.png" in names
        assert f"heatmap_a-b_to_c_problem{problem}_2.png" in names
        assert f"heatmap_singlelayer_x_to_y_problem{problem}.png" in names
    tagged = [n for n in names if re.fullmatch(r"heatmap_(singlelayer_)?(a|A)-b_to_c-[0-9a-f]{8}_problem\d\.png", n)]
    assert len(tagged) == 3 * 2 * 2, sorted(names)  # "a/b", "a b" and "A-b"; two kinds, two problems


def test_each_figure_file_holds_its_own_handoff(tmp_path):
    """No figure overwrote another: every file differs (each hand-off has its own constant value)."""
    capture = _capture_with_agents(tmp_path / "run.h5", CLASHING[:4])
    written = render_capture(capture, tmp_path / "out", kinds=("multi",), progress=False)
    assert len({p.read_bytes() for p in written}) == 4


def test_clash_resolution_does_not_depend_on_the_selection():
    names = [f"{a}_to_{b}" for a, b in CLASHING]
    every = problem_filenames(names, 3, "png")
    assert every == problem_filenames(names, 3, "png")
    assert every[2, "multi"] == "heatmap_a-b_to_c_problem3.png"  # the name that needs no sanitising
    assert every[0, "multi"] != every[1, "multi"] and every[0, "multi"].startswith("heatmap_a-b_to_c-")
    # the multi-layer map of 'singlelayer_x_to_y' and the strip of 'x_to_y' both want one name
    assert every[4, "multi"] != every[5, "single"]
    assert {every[4, "multi"], every[5, "single"]} >= {"heatmap_singlelayer_x_to_y_problem3.png"}


def test_transition_selection_keeps_the_file_names(tmp_path):
    capture = _capture_with_agents(tmp_path / "run.h5", CLASHING)
    full = {p.name for p in render_capture(capture, tmp_path / "all", kinds=("multi",), progress=False)}
    one = render_capture(capture, tmp_path / "one", kinds=("multi",), transitions="a b_to_c", progress=False)
    assert len(one) == 1 and one[0].name in full and one[0].name != "heatmap_a-b_to_c_problem1.png"


# -- temporary files ---------------------------------------------------------------------------------------------

def test_a_render_never_touches_another_renders_temporary_file(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,))
    out = tmp_path / "out"
    out.mkdir()
    target = figure_filename("multi", "planner_to_critic", 1)
    others = [out / f"{target}.tmp", out / f".{target}.tmp"]  # names another render could be writing
    for other in others:
        other.write_bytes(b"another render's half-written figure")
    written = render_capture(capture, out, kinds=("multi",), progress=False)
    for other in others:
        assert other.read_bytes() == b"another render's half-written figure"
    leftovers = {p.name for p in out.iterdir()} - {p.name for p in written} - {p.name for p in others}
    assert not leftovers, leftovers
    assert (out / target).read_bytes().startswith(b"\x89PNG")


def test_figures_get_the_usual_file_mode(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,))
    old = os.umask(0o022)
    try:
        written = render_capture(capture, tmp_path / "out", kinds=("multi",), progress=False)
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in written} == {0o644}


def test_write_atomically_uses_a_temporary_file_of_its_own(tmp_path):
    """Pages, tables and figures are written through one helper: its own temporary name, cleaned up on error."""
    from render.output_files import write_atomically

    other = tmp_path / ".tmp-someone-else"
    other.write_text("another render's")
    seen = []
    write_atomically(tmp_path / "page.html", lambda tmp: seen.append(tmp) or tmp.write_text("new"))
    assert (tmp_path / "page.html").read_text() == "new" and other.read_text() == "another render's"
    assert seen[0].parent == tmp_path and seen[0] != other and not seen[0].exists()

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "page.html", fail)
    assert (tmp_path / "page.html").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "page.html"]


def test_write_atomically_fits_every_name_the_file_system_takes(tmp_path):
    """The temporary name does not grow with the target's: a 255-byte name (ext4's limit) still writes."""
    from render.output_files import write_atomically

    path = tmp_path / ("f" * 251 + ".png")
    write_atomically(path, lambda tmp: tmp.write_bytes(b"png"))
    assert path.read_bytes() == b"png"
