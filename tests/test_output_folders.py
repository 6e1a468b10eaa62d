"""Output folders that cannot be written: one line, and for a run before the model loads.

Two ways in: a folder whose parent is a regular file (fails for every user, root too, which is how CI
runs) and a read-only folder (chmod 0o555; skipped as root, whom modes do not stop)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_render import write_capture  # the synthetic-capture helper (pytest puts tests/ on sys.path)

from latentmas.app.cli import main

RUN = ["--model_name", "tiny-qwen3", "--device", "cpu", "--max_samples", "1", "--max_new_tokens", "2",
       "--latent_steps", "1"]


def _modes_stop_writes() -> bool:
    """Whether a 0o555 folder refuses this process a new file (not for root with CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            with tempfile.TemporaryFile(dir=folder):
                return False
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o755)


MODES_STOP_WRITES = _modes_stop_writes()
needs_modes = pytest.mark.skipif(not MODES_STOP_WRITES, reason="this user (root) writes into read-only folders")


@pytest.fixture
def no_model(monkeypatch, workdir):
    """A model load fails the test: the error must come first."""
    import latentmas.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folders were checked")
    monkeypatch.setattr(latentmas.models, "load_model", load_model)
    return workdir


@pytest.fixture(params=["under a file", "read-only"])
def blocked(request, tmp_path):
    """A folder path that cannot be written, and the words the error must show."""
    if request.param == "under a file":
        (tmp_path / "afile").write_text("x")
        yield tmp_path / "afile" / "sub", "afile is a file, not a folder"
        return
    if not MODES_STOP_WRITES:
        pytest.skip("this user (root) writes into read-only folders")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder / "sub", "Permission denied"
    folder.chmod(0o755)


def _one_line_error(result, *fragments) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unwritable_output_dir_fails_before_the_model_loads(no_model, blocked):
    folder, reason = blocked
    result = CliRunner().invoke(main, ["capture", *RUN, "--output_dir", str(folder),
                                       "--capture_file", str(no_model / "c.h5")])
    _one_line_error(result, "cannot write to --output_dir", reason)
    assert not (no_model / "c.h5").exists()


def test_unwritable_capture_folder_fails_before_the_model_loads(no_model, blocked):
    folder, reason = blocked
    result = CliRunner().invoke(main, ["capture", *RUN, "--output_dir", str(no_model / "runs"),
                                       "--capture_file", str(folder / "c.h5")])
    _one_line_error(result, "cannot write to the folder of --capture_file", reason)


def test_unwritable_charts_folder_fails_before_the_model_loads(no_model, blocked):
    folder, reason = blocked
    result = CliRunner().invoke(main, ["run", *RUN, "--show_heatmaps", "--out", str(folder),
                                       "--output_dir", str(no_model / "runs")])
    _one_line_error(result, "cannot write to --out", reason)


def test_render_into_an_unwritable_folder_is_one_line(tmp_path, blocked):
    folder, reason = blocked
    capture = write_capture(tmp_path / "run.h5", numbers=(1, 2))
    result = CliRunner().invoke(main, ["render", str(capture), "--out", str(folder), "--no-progress"])
    line = _one_line_error(result, "cannot write to output folder", reason)
    assert "could not be fully rendered" not in line


@needs_modes
def test_render_into_an_existing_read_only_folder(tmp_path):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = CliRunner().invoke(main, ["render", str(capture), "--out", str(out), "--no-progress"])
    finally:
        out.chmod(0o755)
    _one_line_error(result, f"cannot write to output folder {out}: Permission denied")
    assert not list(Path(out).iterdir())
