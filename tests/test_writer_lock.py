"""One writer per capture: a second is refused in one line naming the live one; a killed writer's
lock does not block a rerun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hostile import valid_capture

from capture.format import CaptureBusy, CaptureReader, CaptureWriter

REPO = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent("""
    import sys, time
    from capture.format import CaptureWriter
    writer = CaptureWriter.open(sys.argv[1], {}, {"k": 1}, num_layers=3, dtype="float32")
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_live_one(tmp_path):
    path = valid_capture(tmp_path / "run.h5")
    holder = _holder(path)
    try:
        with pytest.raises(CaptureBusy) as refused:
            CaptureWriter.open(path, {}, {"k": 1}, num_layers=3, dtype="float32")
        message = str(refused.value)
        assert "\n" not in message and f"pid {holder.pid} on {socket.gethostname()}" in message, message
        with CaptureReader(path) as reader:  # the refusal changed nothing
            assert reader.problem_numbers == [1, 2]
    finally:
        holder.kill()
        holder.wait()


def test_killed_writer_does_not_block_a_rerun(tmp_path):
    path = valid_capture(tmp_path / "run.h5")
    holder = _holder(path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run.h5.lock").exists()  # left behind, but not held
    with CaptureWriter.open(path, {}, {"k": 1}, num_layers=3, dtype="float32") as writer:
        assert writer.completed_numbers == {1, 2}
    assert not (tmp_path / "run.h5.lock").exists()


def test_two_writers_in_one_process_and_release(tmp_path):
    path = tmp_path / "run.h5"
    first = CaptureWriter.open(path, {}, {"k": 1}, num_layers=3)
    with pytest.raises(CaptureBusy, match=f"pid {os.getpid()}"):
        CaptureWriter.open(path, {}, {"k": 1}, num_layers=3)
    with pytest.raises(CaptureBusy):
        CaptureWriter.open(path, {}, {"k": 1}, num_layers=3, overwrite=True)
    first.close()
    CaptureWriter.open(path, {}, {"k": 1}, num_layers=3).close()
