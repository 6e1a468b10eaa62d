"""The notebook-first Python API: reprs, list-like hand-offs, xarray / pandas tables, and the
example notebook executed in a real Jupyter kernel (nbclient + ipykernel) on a capture made here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from capture.format import CaptureReader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_render import write_capture

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "explore_capture.ipynb"


# -- reprs and hand-off lists ---------------------------------------------------------------------

def test_reprs_name_the_file_model_and_shape_not_the_array(tmp_path):
    path = write_capture(tmp_path / "run.h5", numbers=(1, 2, 3), num_layers=6, widths=(12, 20, 28),
                         attrs={"model_name": "Qwen/Qwen3-4B\x1b]0;x"})
    reader = CaptureReader(path)
    text = repr(reader)
    assert str(path) in text and "3 problems" in text and "6 layers" in text and "finished" in text
    assert "Qwen/Qwen3-4B" in text and "\x1b" not in text  # model name shown escaped, never raw control codes
    handoff = reader.handoffs(1)[0]
    assert repr(handoff) == "<Handoff planner_to_critic: 6 layers x 12 columns, 2 segments>"
    assert "critic_to_refiner" in repr(reader.handoffs(1))
    reader.close()
    assert "closed" in repr(reader)


def test_handoffs_are_a_list_and_an_iterator(tmp_path):
    path = write_capture(tmp_path / "run.h5", numbers=(1,), widths=(12, 20, 28))
    with CaptureReader(path) as reader:
        handoffs = reader.handoffs(1)
        assert len(handoffs) == 3
        assert [h.name for h in handoffs] == ["planner_to_critic", "critic_to_refiner", "refiner_to_judger"]
        assert handoffs[-1].num_columns == 28 and [h.num_columns for h in handoffs[:2]] == [12, 20]
        assert handoffs[1] is handoffs[1]  # read once, kept
        assert next(handoffs).name == "planner_to_critic" and next(handoffs).name == "critic_to_refiner"
        assert len(list(handoffs)) == 3  # iterating is over all of them, whatever next() handed out
        picked = reader.handoffs(1, [2, 0])
        assert [h.name for h in picked] == ["refiner_to_judger", "planner_to_critic"]
        with pytest.raises(IndexError):
            handoffs[3]


# -- xarray and pandas -------------------------------------------------------------------------------

def test_handoff_to_xarray_has_positions_tokens_and_segments(tmp_path):
    pytest.importorskip("xarray")
    path = write_capture(tmp_path / "run.h5", numbers=(1,), num_layers=5, widths=(10, 16), gap_every=4)
    with CaptureReader(path) as reader:
        handoff = reader.handoffs(1)[1]
    da = handoff.to_xarray()
    assert da.dims == ("layer", "column") and da.shape == (5, 16) and da.name == "critic_to_refiner"
    assert da.dtype == np.float32
    np.testing.assert_array_equal(da.values, handoff.layer_similarities.astype(np.float32))
    np.testing.assert_array_equal(da["position"].values, handoff.positions)
    assert list(da["token"].values) == handoff.tokens
    assert list(da["agent"].values) == ["critic"] * 16
    assert list(da["kind"].values) == ["prompt"] * 8 + ["latent"] * 8
    means = da.groupby("segment").mean("column")
    latent = handoff.layer_similarities[:, 8:].mean(axis=1)
    np.testing.assert_allclose(means.sel(segment="critic latent").values, latent, rtol=1e-6)


def test_problems_table(tmp_path):
    pytest.importorskip("pandas")
    path = write_capture(tmp_path / "run.h5", numbers=(3, 1, 2), widths=(12, 20))
    with CaptureReader(path) as reader:
        table = reader.problems_table()
    assert list(table.index) == [3, 1, 2] and table.index.name == "number"
    assert list(table.columns[:5]) == ["question", "gold", "prediction", "correct", "num_handoffs"]
    assert table.loc[2, "question"] == "question 2" and table.loc[3, "prediction"] == "4"
    assert table.loc[2, "correct"] == True and table.loc[1, "correct"] == False  # noqa: E712 (pandas booleans)
    assert table.loc[1, "T planner_to_critic"] == 12 and table.loc[1, "T critic_to_refiner"] == 20


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    from capture import tables

    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray -> ImportError
    with pytest.raises(tables.MissingExtra, match=r'pip install "latentmas\[notebook\]"'):
        tables.handoff_to_xarray(None)


# -- in a real Jupyter kernel ------------------------------------------------------------------------

@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec for this interpreter (never a system 'python3' kernel), the checkout on the path."""
    pytest.importorskip("nbclient")
    from ipykernel.kernelspec import write_kernel_spec

    spec_dir = tmp_path / "jupyter" / "kernels" / "latentmas-test"
    write_kernel_spec(str(spec_dir), overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                         "{connection_file}"], "display_name": "latentmas test"})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return "latentmas-test"


def _execute(nb, kernel_name: str, cwd: Path):
    from nbclient import NotebookClient

    NotebookClient(nb, kernel_name=kernel_name, timeout=180, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb, tag: str) -> list[dict]:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, tag
    return cells[0].outputs


def _has_png(outputs) -> bool:
    return any("image/png" in out.get("data", {}) for out in outputs)


def test_a_returned_figure_shows_inline_in_a_fresh_kernel(kernel_env, tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[
        new_code_cell("import matplotlib\nbefore = matplotlib.get_backend()\nimport numpy as np, render"),
        new_code_cell("render.multi_layer_heatmap(np.zeros((4, 10)), title='a $x^2$ title')",
                      metadata={"tags": ["figure"]}),
        new_code_cell("import sys\nprint(matplotlib.get_backend() == before, 'matplotlib.pyplot' in sys.modules)",
                      metadata={"tags": ["backend"]}),
    ])
    nbformat.validate(nb)
    _execute(nb, kernel_env, tmp_path)
    assert _has_png(_outputs(nb, "figure"))
    # the figure showed without pyplot and without `%matplotlib inline`: importing render changed nothing
    assert _outputs(nb, "backend")[0]["text"].split() == ["True", "False"]


@pytest.mark.slow
def test_example_notebook_runs_on_a_real_capture(kernel_env, tmp_path, tiny_lm, fake_problems, monkeypatch):
    import nbformat
    from captures import solve_and_capture, tiny_config

    capture = tmp_path / "tiny.h5"
    solve_and_capture(tiny_lm, fake_problems()[:2], tiny_config(method="latent_mas"), capture)
    monkeypatch.setenv("LATENTMAS_CAPTURE", str(capture))
    nb = _execute(nbformat.read(NOTEBOOK, as_version=4), kernel_env, tmp_path)  # raises on any cell error
    assert _has_png(_outputs(nb, "side-by-side")) and _has_png(_outputs(nb, "zoom"))
    shown = _outputs(nb, "by-segment")
    assert [out["output_type"] for out in shown] == ["execute_result"]  # no warning on the way
    assert "refiner latent" in shown[0]["data"]["text/plain"]  # the last hand-off reads the refiner's steps
