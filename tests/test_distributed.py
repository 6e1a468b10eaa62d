"""Runs shared over several processes with torchrun (gloo, CPU): one merged capture that equals a
single-process capture bit for bit (2 and 4 ranks), a rank killed mid-run and the rerun, a rerun with
another world size."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capture import merge
from capture.format import CaptureConfigMismatch, CaptureReader, CaptureWriter, ProblemRecord
from latentmas.app.distributed import CPU_THREADS_ENV
from latentmas.app.recording import capture_identity, open_recorder
from latentmas.app.results import PARTS as RESULT_PARTS
from latentmas.app.run import run
from latentmas.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TRANSITIONS = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger")
PROBLEMS = list(range(1, 7))
SETTINGS = dict(model_name="tiny-qwen3", device="cpu", max_samples=6, max_new_tokens=12, latent_steps=3,
                temperature=0.0)
# metadata that may differ between a single-process and a torchrun capture of the same run
VARYING_ATTRS = {"command", "started_at", "world_size"}
VARYING_SUMMARY = {"total_time_sec", "time_per_sample_sec", "merge_time_sec", "world_size", "capture_file",
                   "resumed_problems", "generated_tokens", "rank_idle_sec"}

pytestmark = pytest.mark.slow


def _cli_args(capture_file: Path | None, out: Path) -> list[str]:
    args = ["--model_name", "tiny-qwen3", "--device", "cpu", "--task", "gsm8k", "--max_samples", "6",
            "--max_new_tokens", "12", "--latent_steps", "3", "--temperature", "0", "--output_dir", str(out)]
    return args + (["--capture_file", str(capture_file)] if capture_file is not None else [])


def _torchrun(nproc: int, program: list[str], cwd: Path, env: dict, logs: Path | None = None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if logs is not None:  # each rank's stdout/stderr in its own file
        command += ["--redirects", "3", "--log-dir", str(logs)]
    return subprocess.run(command + program, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def env(tiny_lm_cache_env):
    """The ranks' environment: one intra-op thread each, as torchrun gives them (the reference starts with 2);
    the run computes with the same thread count in every process (`distributed.cpu_threads`)."""
    environ = {k: v for k, v in os.environ.items() if k != CPU_THREADS_ENV}
    return dict(environ, **tiny_lm_cache_env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@contextlib.contextmanager
def threads(count: int):
    """torch computes with `count` intra-op threads in this process until the block ends."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm_cache_env):
    """A single-process capture of the 6 problems, started with 2 intra-op threads (the run uses its own count)."""
    folder = tmp_path_factory.mktemp("reference")
    with threads(2):
        run(RunConfig(**SETTINGS), capture_file=folder / "run.h5", output_dir=folder / "runs", progress=False)
        assert torch.get_num_threads() == 2  # restored
    return folder


def _results(out: Path) -> list[dict]:
    lines = (out / RunConfig(**SETTINGS).run_name() / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_sec"} for line in lines]


def assert_same_capture(path: Path, reference: Path) -> None:
    with CaptureReader(path) as got, CaptureReader(reference / "run.h5") as want:
        assert got.problem_numbers == want.problem_numbers == PROBLEMS
        for number in PROBLEMS:
            assert got.problem(number) == want.problem(number)
            got_handoffs, want_handoffs = list(got.handoffs(number)), list(want.handoffs(number))
            assert [h.name for h in got_handoffs] == [h.name for h in want_handoffs] == list(TRANSITIONS)
            for a, b in zip(got_handoffs, want_handoffs):
                assert a.tokens == b.tokens
                assert a.segments == b.segments
                np.testing.assert_array_equal(a.positions, b.positions)
                np.testing.assert_array_equal(a.layer_similarities, b.layer_similarities)
        assert got.config == want.config
        assert got.num_layers == want.num_layers and got.similarity_dtype == want.similarity_dtype
        got_attrs, want_attrs = got.attrs, want.attrs
        assert set(got_attrs) - VARYING_ATTRS == set(want_attrs) - VARYING_ATTRS
        assert {k: v for k, v in got_attrs.items() if k not in VARYING_ATTRS} == \
               {k: v for k, v in want_attrs.items() if k not in VARYING_ATTRS}
        assert got.finished_at
        assert {k: v for k, v in got.summary.items() if k not in VARYING_SUMMARY} == \
               {k: v for k, v in want.summary.items() if k not in VARYING_SUMMARY}


def test_torchrun_capture_equals_single_process(tmp_path, env, reference):
    capture_file = tmp_path / "captures" / "run.h5"
    done = _torchrun(2, ["-m", "latentmas", "capture", *_cli_args(capture_file, tmp_path / "runs")], tmp_path,
                     env, logs=tmp_path / "logs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_capture(capture_file, reference)
    with CaptureReader(capture_file) as capture:
        assert capture.attrs["world_size"] == 2
        assert capture.summary["world_size"] == 2 and capture.summary["total"] == 6
    assert not merge.shard_dir(capture_file).exists()
    assert _results(tmp_path / "runs") == _results(reference / "runs")
    assert not (tmp_path / "runs" / RunConfig(**SETTINGS).run_name() / RESULT_PARTS).exists()
    # rank 0 prints the summary (and its progress bar); rank 1 prints nothing
    logs = {p.parent.name + "/" + p.name: p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    assert logs["1/stdout.log"] == "" and logs["1/stderr.log"] == "", logs
    summary = json.loads(logs["0/stdout.log"].strip().splitlines()[-1])
    assert summary["total"] == 6 and summary["capture_file"] == str(capture_file)


def _kill_a_rank_then_rerun(world: int, rank: int, capture_file: Path, runs: Path, tmp_path, env, reference):
    """`world` ranks, `rank` killed right after its first problem: nothing is merged and its shard keeps that
    problem; the same command again solves the missing problems and merges a file equal to `reference`'s."""
    program = ["-m", "latentmas", "capture", *_cli_args(capture_file, runs)]
    killed = _torchrun(world, program, tmp_path, dict(env, LATENTMAS_TEST_DIE_AFTER=f"{rank}:1"))
    assert killed.returncode != 0
    assert not capture_file.exists()  # never merged
    with CaptureReader(merge.shard_path(capture_file, rank)) as shard:
        assert len(shard.problem_numbers) == 1  # the rank died right after its first problem
    survivors = merge.completed_numbers(capture_file, capture_identity(
        RunConfig(**SETTINGS), TRANSITIONS, "float16"))
    assert 1 <= len(survivors) < 6
    done = _torchrun(world, program, tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_capture(capture_file, reference)
    with CaptureReader(capture_file) as capture:
        assert capture.summary["resumed_problems"] == len(survivors)
    assert not merge.shard_dir(capture_file).exists()
    assert _results(runs) == _results(reference / "runs")


def test_killed_rank_then_rerun_completes_without_duplicates(tmp_path, env, reference):
    _kill_a_rank_then_rerun(2, 1, tmp_path / "run.h5", tmp_path / "runs", tmp_path, env, reference)


def test_run_without_capture_under_torchrun(tmp_path, env, reference):
    done = _torchrun(2, [str(ROOT / "run.py"), *_cli_args(None, tmp_path / "runs")], tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert len(done.stdout.strip().splitlines()) == 1
    assert summary["total"] == 6 and summary["world_size"] == 2
    assert _results(tmp_path / "runs") == _results(reference / "runs")
    saved = json.loads((tmp_path / "runs" / RunConfig(**SETTINGS).run_name() / "summary.json").read_text())
    assert saved["total"] == 6 and saved["correct"] == summary["correct"]


def _copy(reference: Path, path: Path, numbers, config=None) -> None:
    """A capture file holding some of the reference's problems, as an interrupted run leaves them."""
    with CaptureReader(reference / "run.h5") as source:
        attrs = {k: v for k, v in source.attrs.items() if k not in ("schema_version", "config")}
        with CaptureWriter.open(path, attrs, config or source.config, source.num_layers, source.similarity_dtype,
                                overwrite=True, readout_top_k=source.readout_top_k) as writer:
            for n in numbers:
                p = source.problem(n)
                writer.append(ProblemRecord(n, p.question, p.gold, p.prediction, p.correct,
                                            list(source.handoffs(n))))


def test_rerun_with_another_world_size_uses_the_file_and_every_shard(tmp_path, reference, tiny_lm_cache_env):
    # left by a 3-rank run whose merge never happened, after an earlier single-process run
    capture_file = tmp_path / "run.h5"
    _copy(reference, capture_file, [2])
    _copy(reference, merge.shard_path(capture_file, 0), [1, 4])
    _copy(reference, merge.shard_path(capture_file, 2), [4, 6])  # 4 twice: taken once
    cfg = RunConfig(**SETTINGS)
    summary = run(cfg, capture_file=capture_file, output_dir=tmp_path / "runs", progress=False)
    assert summary["total"] == 6 and summary["resumed_problems"] == 4 and summary["world_size"] == 1
    assert_same_capture(capture_file, reference)
    assert not merge.shard_dir(capture_file).exists()
    assert [r["number"] for r in _results(tmp_path / "runs")] == [3, 5]  # solved by this run


def test_shard_with_other_settings_is_refused(tmp_path, reference, tiny_lm_cache_env):
    capture_file = tmp_path / "run.h5"
    with CaptureReader(reference / "run.h5") as source:
        other = dict(source.config, latent_steps=5)
    _copy(reference, merge.shard_path(capture_file, 1), [1], config=other)
    with pytest.raises(CaptureConfigMismatch, match="rank-00001.h5 .*latent_steps: file has 5, now 3"):
        run(RunConfig(**SETTINGS), capture_file=capture_file, output_dir=tmp_path / "runs", progress=False)
    assert not capture_file.exists()
    with CaptureReader(merge.shard_path(capture_file, 1)) as shard:
        assert shard.problem_numbers == [1]


def test_capture_identity_is_what_the_recorder_stores(tmp_path, tiny_lm):

    cfg = RunConfig(**SETTINGS, knn_filter=True)
    for transitions, dtype in ((TRANSITIONS, "float16"), (None, "float32")):
        recorder = open_recorder(tmp_path / f"{dtype}.h5", cfg, tiny_lm, transitions, dtype, overwrite=True)
        recorder.close()
        with CaptureReader(tmp_path / f"{dtype}.h5") as capture:
            assert capture.config == capture_identity(cfg, transitions, dtype)
            assert capture.config["transitions"] == ("all" if transitions is None else list(TRANSITIONS))
            assert capture.config["capture_dtype"] == dtype and capture.config["knn"]["percentage"] == 0.8


def test_four_ranks_capture_equals_single_process_then_a_killed_rank_resumes(tmp_path, env, reference):
    """4 gloo ranks on 2 cores: the merged file equals the single-process capture bit for bit; a rank killed
    after its first problem leaves its shard, and the same command again completes the run."""
    capture_file = tmp_path / "captures" / "run.h5"
    program = ["-m", "latentmas", "capture", *_cli_args(capture_file, tmp_path / "runs")]
    done = _torchrun(4, program, tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_capture(capture_file, reference)
    with CaptureReader(capture_file) as capture:
        assert capture.attrs["world_size"] == 4 and capture.summary["world_size"] == 4
        idle = capture.summary["rank_idle_sec"]
        assert len(idle) == 4 and min(idle) == 0 and all(i >= 0 for i in idle)
    assert _results(tmp_path / "runs") == _results(reference / "runs")

    _kill_a_rank_then_rerun(4, 2, tmp_path / "killed" / "run.h5", tmp_path / "killed-runs", tmp_path, env,
                            reference)


def test_cpu_thread_count_is_checked_before_anything_starts(tmp_path, monkeypatch, tiny_lm_cache_env):
    monkeypatch.setenv(CPU_THREADS_ENV, "two")
    with pytest.raises(ValueError, match="LATENTMAS_CPU_THREADS='two' is not a thread count"):
        run(RunConfig(**SETTINGS), capture_file=tmp_path / "run.h5", output_dir=tmp_path / "runs", progress=False)
    assert not (tmp_path / "run.h5").exists()
