"""kill -9 at every write: a capture (fresh, and resumed) killed at its N-th pwrite64/fsync/fallocate/
ftruncate/rename/openat by `strace -e inject=...:signal=KILL:when=N` stays readable with every problem
it had committed, and a rerun completes with problems 1..N exactly once.

The writes come from a small script that drives CaptureWriter directly (about 160 pwrite64 calls for
two problems), so the many kill points cost seconds, not a model load each. The real runner and its
results.jsonl are killed at a designed sample of points in the second half of this file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from capture.format import CaptureError, CaptureReader

REPO = Path(__file__).resolve().parents[1]
EVERY_KTH_PWRITE = 4

WRITE = textwrap.dedent("""
    import sys
    import numpy as np
    from capture.format import CaptureWriter, Handoff, ProblemRecord, Segment
    path, last = sys.argv[1], int(sys.argv[2])
    with CaptureWriter.open(path, {"model_name": "m"}, {"a": 1}, 4) as writer:
        for number in range(1, last + 1):
            if number not in writer.completed_numbers:
                width = 20 + number
                values = np.random.default_rng(number).uniform(-1, 1, (4, width))
                handoff = Handoff("planner", "critic", values, np.arange(width), [f"t{i}" for i in range(width)],
                                  [Segment("planner", "prompt", 0, width)])
                writer.append(ProblemRecord(number, f"q{number}", "1", "1", True, [handoff]))
                print("committed", number, flush=True)
        writer.finish("now", {"total": last})
""")

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")


def _write(path: Path, last: int, inject: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WRITE, str(path), str(last)]
    if inject:
        command = ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"inject={inject}", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=path.parent,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def _count_calls(path: Path, last: int) -> dict[str, int]:
    trace = path.with_suffix(".count")
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                           "trace=pwrite64,fsync,fallocate,ftruncate,rename,openat", sys.executable, "-c", WRITE,
                           str(path), str(last)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    names = re.findall(r"^\d+\s+(\w+)\(", trace.read_text(), flags=re.M)
    return {name: names.count(name) for name in set(names)}


def _check_problems(path: Path, numbers) -> None:
    with CaptureReader(path) as reader:
        assert reader.problem_numbers == list(numbers)
        for number in numbers:
            (handoff,) = reader.handoffs(number)
            want = np.random.default_rng(number).uniform(-1, 1, (4, 20 + number))
            np.testing.assert_allclose(handoff.layer_similarities.astype(np.float32), want, atol=1e-3)
            assert handoff.tokens == [f"t{i}" for i in range(20 + number)]


def _kill_then_rerun(folder: Path, start: Path | None, first: int, last: int, inject: str) -> str | None:
    """One kill point; returns None, or what went wrong."""
    folder.mkdir()
    path = folder / "run.h5"
    if start is not None:
        shutil.copy(start, path)
    killed = _write(path, last, inject)
    if killed.returncode == 0:
        return None  # the run had fewer such calls: nothing killed
    if killed.returncode != -9:
        return f"{inject}: exit {killed.returncode}: {killed.stderr[-500:]}"
    committed = [int(n) for n in re.findall(r"committed (\d+)", killed.stdout)]
    survivors = list(range(1, first)) + committed
    try:
        with CaptureReader(path) as reader:
            found = reader.problem_numbers
        if found[:len(survivors)] != survivors or found != list(range(1, len(found) + 1)):
            return f"{inject}: after the kill the file holds {found}, committed were {survivors}"
    except CaptureError as error:
        if survivors:
            return f"{inject}: unreadable after the kill with {survivors} committed: {error}"
    rerun = _write(path, last)
    if rerun.returncode != 0:
        return f"{inject}: rerun failed: {rerun.stderr[-500:]}"
    try:
        _check_problems(path, range(1, last + 1))
    except AssertionError as error:
        return f"{inject}: after the rerun: {error}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fresh", "resume"])
def test_kill_at_every_write_keeps_committed_and_rerun_completes(tmp_path, scenario):
    start = None
    first, last = 1, 2
    if scenario == "resume":
        start = tmp_path / "start.h5"
        assert _write(start, 2).returncode == 0
        first, last = 3, 4
    probe = tmp_path / "probe.h5"
    if start is not None:
        shutil.copy(start, probe)
    counts = _count_calls(probe, last)
    points = [f"pwrite64:signal=KILL:when={n}" for n in range(1, counts["pwrite64"] + 1, EVERY_KTH_PWRITE)]
    points += [f"pwrite64:signal=KILL:when={counts['pwrite64']}"]
    for name in ("fsync", "fallocate", "ftruncate", "rename"):
        points += [f"{name}:signal=KILL:when={n}" for n in range(1, counts.get(name, 0) + 1)]
    # the writer's own openat calls are the last ones (the imports come first)
    points += [f"openat:signal=KILL:when={n}" for n in range(max(1, counts["openat"] - 8), counts["openat"] + 1)]
    assert counts["pwrite64"] > 50 and counts["fsync"] >= 4, counts
    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = list(pool.map(lambda item: _kill_then_rerun(tmp_path / f"k{item[0]}", start, first, last,
                                                               item[1]), enumerate(points)))
    failures = [p for p in problems if p]
    assert not failures, f"{len(failures)} of {len(points)} kill points failed: " + " | ".join(failures[:5])


# --------------------------------------------------------------------------- the real runner and results.jsonl
#
# `latentmas capture` on tiny-qwen3 (3 problems, one per batch) killed by strace at a write, its rerun
# killed again at a write of the resume, that rerun killed once more, then a last rerun to completion.
# Every run costs a process start and a model load (about 9 s under strace on the 2-core CI machine),
# so the kill points are a designed sample, not a sweep: 4 chains of 3 kills (17 runs, about 2 minutes).
# They hit the calls where results.jsonl can be torn, doubled or lost: a results line written while
# the problem is not yet committed (fresh and resumed), results.jsonl.tmp written but not renamed,
# summary.json renamed after results.jsonl, the results part opened at a resume, and the capture's
# pwrite64 and fsync around a commit (the capture's own writes are swept every 4th above).
# `-P` makes strace count only the calls that touch those files (a rename by its first path, the
# .tmp name), and strace counts each thread on its own. (`--seccomp-bpf` would be faster, but with it
# strace 6.1 injects nothing.)

RUNNER_ARGS = ["capture", "--model_name", "tiny-qwen3", "--device", "cpu", "--max_samples", "3",
               "--max_new_tokens", "4", "--latent_steps", "1", "--generate_bs", "1"]
RESULT_FILES = ("results.shards/rank-00000.jsonl", "results.jsonl", "results.jsonl.tmp", "summary.json",
                "summary.json.tmp")
VARYING = ("time_sec",)  # results fields that differ between two runs of the same problems


def _kills(probe_counts: dict) -> list[list[tuple[str, str]]]:
    """The kill chains, as (files, syscall:N) pairs; the first of each chain kills a fresh run."""
    pwrite = probe_counts["capture", "pwrite64"]
    return [
        # problem 2's results line written, its capture commit not begun (so the rerun solves it again and
        # its part holds problem 2 twice); the resume killed before writing that line, then mid-way through
        # its capture writes, then at results.jsonl's rename
        [("capture", f"pwrite64:{probe_counts['capture', 'pwrite64 after line 2']}"), ("results", "write:1"),
         ("capture", f"pwrite64:{pwrite // 3}"), ("results", "rename:1")],
        # results.jsonl.tmp about to be written (all committed); then reruns with nothing left to solve,
        # killed at summary.json's rename (results.jsonl in, parts gone), at opening the results part,
        # at the capture's first fsync
        [("results", "write:4"), ("results", "rename:2"), ("results", "openat:1"), ("capture", "fsync:1")],
    ]


def _runner_env(cache_env: dict) -> dict:
    return dict(os.environ, **cache_env, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", TQDM_DISABLE="1")


def _runner(folder: Path, env: dict, strace: list[str] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "latentmas", *RUNNER_ARGS, "--capture_file", str(folder / "run.h5"),
               "--output_dir", str(folder / "runs")]
    if strace:
        command = ["strace", "-f", "-qq", *strace, *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=folder, env=env)


def _watched(folder: Path, run_name: str, which: str) -> list[str]:
    """strace `-P` options for the results files ("results"), the capture file ("capture") or both."""
    capture = ["-P", str(folder / "run.h5")]
    results = [arg for name in RESULT_FILES for arg in ("-P", str(folder / "runs" / run_name / name))]
    return {"capture": capture, "results": results, "both": capture + results}[which]


def _results(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VARYING}
            for line in path.read_text(encoding="utf-8").splitlines()]


FIRST_PATH = re.compile(r'^(\d+)\s+(\w+)\((?:\d+<([^>]*)>|AT_FDCWD, "([^"]*)"|"([^"]*)")', flags=re.M)


def _probe(folder: Path, env: dict) -> tuple[str, list[dict], dict]:
    """A fresh run, traced: its run folder's name, its results, and (files, syscall) -> the most calls
    one thread made on those files ("capture" or "results"; a call counts by its first path)."""
    from latentmas.config import RunConfig

    settings = dict(zip(RUNNER_ARGS[1::2], RUNNER_ARGS[2::2]))
    run_name = RunConfig.from_params({k.lstrip("-"): v if k in ("--model_name", "--device") else int(v)
                                      for k, v in settings.items()}).run_name()
    trace = folder.parent / "probe.trace"
    traced = _runner(folder, env, ["-y", "-o", str(trace), *_watched(folder, run_name, "both"),
                                   "-e", "trace=write,pwrite64,rename,openat,fsync"])
    assert traced.returncode == 0, traced.stderr[-2000:]
    assert [p.name for p in (folder / "runs").iterdir()] == [run_name]
    per_thread: dict[tuple[str, str, str], int] = {}
    counts: dict[tuple[str, str], int] = {}
    for tid, name, *paths in FIRST_PATH.findall(trace.read_text()):
        which = "capture" if "".join(paths) == str(folder / "run.h5") else "results"
        per_thread[tid, which, name] = per_thread.get((tid, which, name), 0) + 1
        # the first capture write after problem 2's results line (the line is written, its commit not begun)
        if (which, name) == ("capture", "pwrite64") and per_thread.get((tid, "results", "write")) == 2:
            counts.setdefault(("capture", "pwrite64 after line 2"), per_thread[tid, which, name])
    for (_, which, name), n in per_thread.items():
        counts[which, name] = max(counts.get((which, name), 0), n)
    return run_name, _results(folder / "runs" / run_name / "results.jsonl"), counts


def _check_after_kill(folder: Path, run_name: str, kept: list[int]) -> list[int]:
    """After a kill: the capture holds problems 1..k (k >= len(kept)), among them `kept`; results.jsonl,
    if there, is whole with no problem twice. Returns the capture's problems."""
    run_dir = folder / "runs" / run_name
    part = run_dir / RESULT_FILES[0]
    try:
        with CaptureReader(folder / "run.h5") as reader:
            found = reader.problem_numbers
    except CaptureError as error:
        # only a capture killed while being created, before any problem was solved, may be unreadable
        assert not kept and not (part.exists() and part.read_bytes().count(b"\n")), str(error)
        found = []
    assert found == list(range(1, len(found) + 1)) and found[:len(kept)] == kept, (found, kept)
    if (run_dir / "results.jsonl").exists():
        numbers = [r["number"] for r in _results(run_dir / "results.jsonl")]
        assert len(numbers) == len(set(numbers)), f"results.jsonl after the kill: {numbers}"
    return found


def _runner_chain(folder: Path, run_name: str, env: dict, kills: list[tuple[str, str]],
                  reference: list[dict]) -> tuple[list[str], str | None]:
    """Kill at each of `kills` in turn, each in a rerun of the last, then rerun to completion.
    Returns the kill points that were not reached, and None or what went wrong."""
    folder.mkdir()
    kept: list[int] = []
    missed = []
    try:
        for which, point in kills:
            syscall = point.split(":")[0]
            proc = _runner(folder, env, ["-o", os.devnull, *_watched(folder, run_name, which),
                                         "-e", f"trace={syscall}", "-e", f"inject={point.replace(':', ':signal=KILL:when=')}"])
            if proc.returncode not in (0, -9):
                return missed, f"{which} {point}: exit {proc.returncode}: {proc.stderr[-500:]}"
            if proc.returncode == 0:
                missed.append(f"{which} {point}")
            kept = _check_after_kill(folder, run_name, kept)
        final = _runner(folder, env)
        if final.returncode != 0:
            return missed, f"{kills}: the last rerun failed: {final.stderr[-500:]}"
        with CaptureReader(folder / "run.h5") as reader:
            assert reader.problem_numbers == [1, 2, 3], f"the capture holds {reader.problem_numbers}"
        got = _results(folder / "runs" / run_name / "results.jsonl")
        assert got == reference, f"results.jsonl holds {[r['number'] for r in got]}, not problems 1..3 as solved"
        assert not (folder / "runs" / run_name / "results.shards").exists()
    except AssertionError as error:
        return missed, f"{kills}: {error}"
    return missed, None


@pytest.mark.slow
def test_runner_killed_at_results_writes_keeps_every_problem_once(tmp_path, tiny_lm_cache_env):
    env = _runner_env(tiny_lm_cache_env)
    probe = tmp_path / "probe"
    probe.mkdir()
    run_name, reference, counts = _probe(probe, env)
    assert [r["number"] for r in reference] == [1, 2, 3]
    # a fresh run writes 3 results lines, results.jsonl.tmp and summary.json.tmp, and renames both
    assert counts["results", "write"] == 5 and counts["results", "rename"] == 2, counts
    assert counts["capture", "pwrite64"] > 50 and counts["capture", "fsync"] >= 4, counts
    chains = _kills(counts)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda item: _runner_chain(tmp_path / f"chain{item[0]}", run_name, env, item[1],
                                                            reference), enumerate(chains)))
    failures = [problem for _, problem in outcomes if problem]
    assert not failures, f"{len(failures)} of {len(chains)} kill chains failed: " + " | ".join(failures)
    missed = [point for points, _ in outcomes for point in points]
    assert not missed, f"runs not killed (the kill point was not reached): {missed}"
