"""Non-finite numbers for options are one-line usage errors (issue 20, point 10): --vmin nan, --vmax inf
for render; --temperature inf, --top_p nan for a run (refused before a model is looked at)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_render import write_capture  # the synthetic-capture helper (pytest puts tests/ on sys.path)

from latentmas.app.cli import main


def _usage_error(result, option: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and option in lines[0] and "finite" in lines[0], result.output


@pytest.mark.parametrize("option, value", [("--vmin", "nan"), ("--vmax", "inf"), ("--vmin", "-inf")])
def test_render_refuses_non_finite_colour_limits(tmp_path, option, value):
    capture = write_capture(tmp_path / "run.h5", numbers=(1,))
    result = CliRunner().invoke(main, ["render", str(capture), "--out", str(tmp_path / "out"), option, value])
    _usage_error(result, option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--temperature", "inf"), ("--top_p", "nan"), ("--temperature", "nan")])
def test_run_refuses_non_finite_sampling_settings(tmp_path, option, value):
    result = CliRunner().invoke(main, ["run", "--model_name", "tiny-qwen3", "--output_dir", str(tmp_path / "runs"),
                                       option, value])
    _usage_error(result, option)
    assert not (tmp_path / "runs").exists()
