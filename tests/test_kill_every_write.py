"""kill -9 at every write: a capture (fresh, and resumed) killed at its N-th pwrite64/fsync/fallocate/
ftruncate/rename/openat by `strace -e inject=...:signal=KILL:when=N` stays readable with every problem
it had committed, and a rerun completes with problems 1..N exactly once.

The writes come from a small script that drives CaptureWriter directly (about 160 pwrite64 calls for
two problems), so the many kill points cost seconds, not a model load each. results.jsonl is the
runner's and is not checked here.
"""

from __future__ import annotations

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
