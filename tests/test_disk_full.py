"""A full disk or a file-size limit while capturing: one line, no crash, committed problems kept,
and a rerun after freeing space completes."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capture.format import CaptureReader

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = 30

# Writes problems 1..N (skipping those already there); 8 layers x 400 columns each, ~35 KB compressed.
FILL = textwrap.dedent("""
    import sys
    import numpy as np
    from capture.format import CaptureError, CaptureWriter, Handoff, ProblemRecord
    path, count = sys.argv[1], int(sys.argv[2])
    try:
        with CaptureWriter.open(path, {}, {"a": 1}, 8) as writer:
            for number in range(1, count + 1):
                if number not in writer.completed_numbers:
                    rng = np.random.default_rng(number)
                    handoff = Handoff("a", "b", rng.uniform(-1, 1, (8, 400)), np.arange(400), ["tok"] * 400, [])
                    writer.append(ProblemRecord(number, f"q{number}", "1", "1", True, [handoff]))
                    print(number, flush=True)
            writer.finish("now", {"total": count})
    except CaptureError as error:
        print(error, file=sys.stderr)
        sys.exit(3)
""")


def _fill(path: Path, size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_limit, size_limit))

    return subprocess.run([sys.executable, "-c", FILL, str(path), str(PROBLEMS)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          preexec_fn=limit if size_limit else None)


def _check_failure(proc, path: Path) -> list[int]:
    """One line, exit 3 (no signal, no traceback); returns the problems it reported committed."""
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return [int(n) for n in proc.stdout.split()]


def _check_rerun_completes(path: Path) -> None:
    proc = _fill(path)
    assert proc.returncode == 0, proc.stderr
    with CaptureReader(path) as reader:
        assert reader.problem_numbers == list(range(1, PROBLEMS + 1))
        assert reader.summary == {"total": PROBLEMS}


@pytest.mark.parametrize("limit_kb", [8, 600, 1100, 1400])
def test_file_size_limit(tmp_path, limit_kb):
    path = tmp_path / "run.h5"
    proc = _fill(path, limit_kb * 1024)
    committed = _check_failure(proc, path)
    assert ("File too large" in proc.stderr), proc.stderr
    if committed:
        with CaptureReader(path) as reader:  # what was committed is there, whole
            assert reader.problem_numbers == committed
            assert all(h.num_columns == 400 for n in committed for h in reader.handoffs(n))
    _check_rerun_completes(path)


def test_full_disk_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        path = mount / "run.h5"
        proc = _fill(path)
        committed = _check_failure(proc, path)
        assert "No space left on device" in proc.stderr, proc.stderr
        assert committed, "the tmpfs should hold a few problems"
        with CaptureReader(path) as reader:
            assert reader.problem_numbers == committed
        moved = tmp_path / "run.h5"  # "free space": carry on where there is room
        shutil.copy(path, moved)
        _check_rerun_completes(moved)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
