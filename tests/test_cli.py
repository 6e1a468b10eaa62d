"""End-to-end runs of the `latentmas run` command / `python run.py` on tiny-qwen3, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from latentmas.app.cli import main, run_command

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"method", "model", "accuracy", "correct", "total", "total_time_sec", "time_per_sample_sec",
                "generated_tokens"}
RESULT_KEYS = {"question", "gold", "prediction", "correct", "agents", "time_sec"}
AGENT_KEYS = {"agent", "input", "output", "input_tokens", "output_tokens"}
GSM_RECORDS = [
    {"question": "Sam has 3 red pens and 4 blue pens. How many pens does he have?",
     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = <<6*5=30>>30\n#### 30"},
    {"question": "Lea had 20 dollars and spent 8. How much is left?", "answer": "20 - 8 = 12\n#### 12"},
]


def base_args(out: Path, *extra: str) -> list[str]:
    return ["--model_name", "tiny-qwen3", "--device", "cpu", "--max_samples", "2", "--max_new_tokens", "16",
            "--latent_steps", "2", "--output_dir", str(out), *extra]


def invoke(command, args: list[str]):
    result = CliRunner().invoke(command, args)
    assert "Traceback" not in result.output, result.output
    return result


def ok(command, args: list[str]) -> dict:
    result = invoke(command, args)
    assert result.exit_code == 0, result.output
    assert result.exception is None
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    check_summary(summary)
    return summary


def check_summary(summary: dict) -> None:
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["model"] == "tiny-qwen3"
    assert 0 <= summary["correct"] <= summary["total"]
    assert summary["accuracy"] == pytest.approx(summary["correct"] / summary["total"])
    assert summary["total_time_sec"] >= 0 and summary["time_per_sample_sec"] >= 0
    assert isinstance(summary["generated_tokens"], int)


def read_results(run_dir: Path) -> list[dict]:
    """Results of the run whose folder is `run_dir` plus the settings digest (`RunConfig.run_name`)."""
    matches = [p for p in run_dir.parent.iterdir() if re.fullmatch(re.escape(run_dir.name) + r"_[0-9a-f]{6}", p.name)]
    assert len(matches) == 1, matches
    run_dir = matches[0]
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    for result in results:
        assert RESULT_KEYS <= result.keys()
        assert isinstance(result["correct"], bool)
        assert result["time_sec"] >= 0
        for agent in result["agents"]:
            assert AGENT_KEYS <= agent.keys()
            assert agent["input_tokens"] > 0 and agent["output_tokens"] >= 0
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["total"] == len(results)
    return results


def error_line(result) -> str:
    """The `Error: ...` line click printed (exactly one)."""
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("method, agents", [("latent_mas", 4), ("text_mas", 4), ("baseline", 1)])
def test_methods_end_to_end(workdir, method, agents):
    out = workdir / "runs"
    summary = ok(main, ["run", "--method", method, *base_args(out)])
    assert summary["method"] == method and summary["total"] == 2 and summary["task"] == "gsm8k"
    results = read_results(out / f"{method}_gsm8k_tiny-qwen3")
    assert len(results) == 2
    assert summary["generated_tokens"] == sum(a["output_tokens"] for r in results for a in r["agents"])
    bundled = [json.loads(line) for line in (ROOT / "data" / "gsm8k.jsonl").read_text().splitlines()[:2]]
    for result, record in zip(results, bundled):
        assert result["question"] == record["question"].strip()
        assert result["gold"] == record["answer"].split("####")[-1].strip()
        assert len(result["agents"]) == agents
        assert result["question"] in result["agents"][0]["input"]
        judger = result["agents"][-1]
        assert 1 <= judger["output_tokens"] <= 16
    if method == "latent_mas":
        for result in results:
            assert [a["agent"] for a in result["agents"]] == ["planner", "critic", "refiner", "judger"]
            assert [a["output"] for a in result["agents"][:3]] == ["", "", ""]
            assert [a["latent_steps"] for a in result["agents"]] == [2, 2, 2, 0]
    if method == "text_mas":
        for result in results:
            assert all(a["output_tokens"] >= 1 for a in result["agents"])
    assert not (workdir / "captures").exists()  # no capture unless asked


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["top", "bottom", "random"])
def test_knn_filter_end_to_end(workdir, strategy):
    out = workdir / "runs"
    summary = ok(run_command, base_args(out, "--knn_filter", "--knn_strategy", strategy, "--knn_percentage", "0.5",
                                        "--knn_min_keep", "3"))
    assert summary["method"] == "latent_mas" and summary["total"] == 2
    results = read_results(out / f"latent_mas_gsm8k_tiny-qwen3_knn{strategy}0.5")
    assert len(results) == 2


@pytest.mark.slow
def test_generate_bs_2_matches_one_by_one(workdir):
    """Sampling (default temperature) draws from per-problem generators, so batching changes nothing."""
    one = ok(run_command, base_args(workdir / "bs1"))
    two = ok(run_command, base_args(workdir / "bs2", "--generate-bs", "2"))  # dashed spelling works too
    assert one["total"] == two["total"] == 2
    first = read_results(workdir / "bs1" / "latent_mas_gsm8k_tiny-qwen3")
    second = read_results(workdir / "bs2" / "latent_mas_gsm8k_tiny-qwen3")
    assert [r["agents"][-1]["output"] for r in first] == [r["agents"][-1]["output"] for r in second]
    assert one["generated_tokens"] == two["generated_tokens"]


@pytest.mark.slow
def test_data_file(workdir):
    data = workdir / "mini_gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM_RECORDS))
    out = workdir / "runs"
    summary = ok(run_command, base_args(out, "--method", "baseline", "--data_file", str(data)))
    assert summary["total"] == 2
    results = read_results(out / "baseline_gsm8k_tiny-qwen3")
    assert [r["question"] for r in results] == [r["question"] for r in GSM_RECORDS[:2]]
    assert [r["gold"] for r in results] == ["7", "30"]


@pytest.mark.slow
def test_run_py_script(workdir, tiny_lm_cache_env):
    env = dict(os.environ, **tiny_lm_cache_env, HF_HUB_OFFLINE="1")
    out = workdir / "runs"
    process = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--method", "latent_mas", "--task", "gsm8k", *base_args(out)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    check_summary(summary)
    assert summary["method"] == "latent_mas" and summary["total"] == 2
    assert len(read_results(out / "latent_mas_gsm8k_tiny-qwen3")) == 2


def test_help_lists_seed_options():
    result = invoke(run_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--method", "--model_name", "--latent_steps", "--knn_filter", "--knn_percentage", "--generate_bs",
                   "--data_file", "--show_heatmaps"):
        assert option in result.output, option


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, expected", [
    (["--knn_percentage", "0"], "knn_percentage"),
    (["--knn_percentage", "1.5"], "knn_percentage"),
    (["--latent_steps", "-1"], "latent_steps"),
    (["--task", "nope"], "'nope' is not one of"),
    (["--method", "nope"], "'nope' is not one of"),
    (["--knn_strategy", "middle"], "'middle' is not one of"),
    (["--data_file", "no/such/file.jsonl"], "does not exist"),
    (["--max_new_tokens", "0"], "max_new_tokens"),
    (["--generate_bs", "0"], "generate_bs"),
    (["--show_heatmaps", "--method", "text_mas"], "need --method latent_mas"),
    (["--show_heatmaps_singlelayer", "--method", "baseline"], "need --method latent_mas"),
])
def test_bad_options_are_one_line_errors(workdir, args, expected):
    result = invoke(run_command, base_args(workdir / "runs", *args))
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert expected in error_line(result) or expected in result.output, result.output
    assert not (workdir / "runs").exists()


def test_malformed_jsonl_names_file_and_line(workdir):
    data = workdir / "broken.jsonl"
    data.write_text(json.dumps(GSM_RECORDS[0]) + "\n" + '{"question": "unfinished\n' + json.dumps(GSM_RECORDS[1]) + "\n")
    result = invoke(main, ["run", *base_args(workdir / "runs", "--data_file", str(data))])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    line = error_line(result)
    assert f"{data}:2" in line and "not valid JSON" in line


def test_missing_field_names_file_and_line(workdir):
    data = workdir / "fields.jsonl"
    data.write_text(json.dumps(GSM_RECORDS[0]) + "\n" + json.dumps({"question": "no answer here"}) + "\n")
    result = invoke(run_command, base_args(workdir / "runs", "--data_file", str(data)))
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    line = error_line(result)
    assert f"{data}:2" in line and "answer" in line


@pytest.mark.parametrize("args, expected", [
    (["--model_name", "./no-such-model"], "cannot load model './no-such-model'"),
    (["--device", "banana"], "unknown device 'banana'"),
])
def test_model_and_device_errors_are_one_line(workdir, args, expected):
    result = invoke(run_command, [*base_args(workdir / "runs"), *args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert expected in error_line(result)


def test_seed_heatmap_flags_leave_six_seed_named_pngs_per_problem(workdir):
    """What `make demo` runs: capture, then both kinds of figure into charts/ (seed file names)."""
    ok(run_command, base_args(workdir / "runs", "--show_heatmaps", "--show_heatmaps_singlelayer"))
    handoffs = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger")
    expected = {f"heatmap_{prefix}{h}_problem{n}.png"
                for n in (1, 2) for h in handoffs for prefix in ("", "singlelayer_")}
    assert {p.name for p in (workdir / "charts").glob("*.png")} == expected
    # one flag alone draws one kind; a rerun resumes the capture and redraws
    for png in (workdir / "charts").glob("*.png"):
        png.unlink()
    ok(run_command, base_args(workdir / "runs", "--show_heatmaps_singlelayer"))
    assert {p.name for p in (workdir / "charts").glob("*.png")} == {n for n in expected if "singlelayer" in n}
