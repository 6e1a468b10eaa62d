"""Hostile capture files (tests/hostile.py): each gives one line within a time bound, and nothing
outside the file is opened (checked with strace on the canary files), or, for hostile text, opens
with that text shown as text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import ACCEPTED, CANARY_TEXT, CASES, make_case

REPO = Path(__file__).resolve().parents[1]
TIME_BOUND_S = 30  # the slowest case takes about a second alone on the 2-core CI machine

# Reads everything a renderer or `info` would: metadata, every problem, every hand-off's matrix.
READ_ALL = """
import sys
from capture.format import CaptureError, CaptureReader
from render.info import describe, describe_problem, safe
try:
    text = [describe(sys.argv[1])]
    with CaptureReader(sys.argv[1]) as reader:
        for number in reader.problem_numbers:
            text.append(describe_problem(sys.argv[1], number))
            for handoff in reader.handoffs(number):
                handoff.layer_similarities.sum(), handoff.tokens, handoff.positions
except CaptureError as error:
    print(safe(error), file=sys.stderr)
    sys.exit(1)
print("\\n".join(text))
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def _read_all(path: Path, trace: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", READ_ALL, str(path)]
    if trace is not None:
        command = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2,creat,stat,newfstatat,statx",
                   "-o", str(trace), *command]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIME_BOUND_S,
                          cwd=path.parent)


def _opened_canary(trace: Path) -> list[str]:
    return [line for line in trace.read_text(errors="replace").splitlines()
            if "canary" in line and ("open" in line or "creat" in line)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_file_is_one_line_in_bounded_time(case, folder):
    path = make_case(case, folder)
    trace = folder / f"{case}.strace" if shutil.which("strace") else None
    proc = _read_all(path, trace)  # a hang fails here with TimeoutExpired
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert path.name in lines[0], lines[0]
    assert CANARY_TEXT not in proc.stdout + proc.stderr
    if trace is not None:
        assert not _opened_canary(trace), _opened_canary(trace)


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_hostile_text_is_shown_as_text(case, folder):
    path = make_case(case, folder)
    proc = _read_all(path)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    if case == "escape_sequences":
        assert "evil\\x1b]0;window-title\\x07" in proc.stdout
    if case == "mathtext_model_name":
        assert r"my $x^2$ model $\undefinedcmd$" in proc.stdout
    if case == "infinite_cells":
        assert "18 ±Inf (not similarities)" in proc.stdout and "values (no finite values)" in proc.stdout


def test_info_cli_refuses_in_one_line_and_sanitises(folder):
    bad = make_case("external_link", folder)
    proc = subprocess.run([sys.executable, "-m", "render", "info", str(bad)], env=_env(), capture_output=True,
                          text=True, timeout=TIME_BOUND_S)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "external link" in proc.stderr, proc.stderr
    evil = make_case("escape_sequences", folder)
    for extra, shown in (((), "evil\\x1b]0;"), (("--problem", "1"), "q\\x1b]0;")):
        proc = subprocess.run([sys.executable, "-m", "render", "info", str(evil), *extra], env=_env(),
                              capture_output=True, text=True, timeout=TIME_BOUND_S)
        assert proc.returncode == 0 and "\x1b" not in proc.stdout and shown in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "render", "info", str(evil), "--json"], env=_env(),
                          capture_output=True, text=True, timeout=TIME_BOUND_S)
    data = json.loads(proc.stdout)  # the text is kept exactly, escaped by JSON
    assert "\x1b" not in proc.stdout and data["attrs"]["model_name"].startswith("evil\x1b]0;")
    assert [p["number"] for p in data["problems"]] == [1, 2]
    assert data["problems"][0]["handoffs"] == [{"name": "planner_to_critic", "columns": 6},
                                               {"name": "critic_to_judger", "columns": 9}]


def test_capture_path_that_is_a_fifo_does_not_block(folder):
    fifo = folder / "pipe.h5"
    if not fifo.exists():
        os.mkfifo(fifo)
    proc = _read_all(fifo)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr


@pytest.mark.parametrize("question, reason", [("a\x00b", "NUL character"), ("a\udc80b", "lone surrogate")])
def test_unstorable_question_is_refused_before_anything_is_written(tmp_path, question, reason):
    from capture.format import CaptureError, CaptureWriter

    path = tmp_path / "run.h5"
    with pytest.raises(CaptureError) as refused:
        CaptureWriter.open(path, {}, {"k": 1}, num_layers=2, questions={1: "fine", 2: question})
    assert "problem 2" in str(refused.value) and reason in str(refused.value) and "\n" not in str(refused.value)
    assert not path.exists() and not (tmp_path / "run.h5.lock").exists()


def test_token_texts_a_capture_cannot_store_are_kept_escaped(tiny_lm, fake_problems, tmp_path, monkeypatch):
    """A byte-level vocabulary has tokens for the NUL byte and for broken UTF-8: the capture keeps them,
    escaped, instead of refusing the run (questions with a NUL are still refused, above)."""
    from captures import solve_and_capture

    from capture.format import CaptureReader, storable_text
    from latentmas.config import RunConfig

    assert storable_text("a\x00b\udc80") == "a\\x00b\\udc80" and storable_text("plain é") == "plain é"
    decode = tiny_lm.tokenizer.decode
    def broken(*args, **kwargs):  # every text the model writes: token texts, and the answers' text
        text = decode(*args, **kwargs)
        return "\x00" + text + "\udc80" if isinstance(text, str) else ["\x00" + t for t in text]

    monkeypatch.setattr(tiny_lm.tokenizer, "decode", broken)
    cfg = RunConfig(model_name="tiny-qwen3", device="cpu", latent_steps=2, max_new_tokens=4, temperature=0.0)
    path = tmp_path / "nul.h5"
    solve_and_capture(tiny_lm, fake_problems()[:1], cfg, path, 1)
    with CaptureReader(path) as reader:
        handoff = reader.handoffs(reader.problem_numbers[0])[0]
        assert handoff.tokens[0].startswith("\\x00") and handoff.tokens[0].endswith("\\udc80")
        assert "\x00" not in (reader.problem(reader.problem_numbers[0]).prediction or "")
