"""Captures open with every reader the project allows: the oldest declared h5py (a second venv, built by
.ci/run into ~/.cache/latentmas-test) and HDF5 1.10 tools (Debian's h5dump)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from hostile import valid_capture

from capture.format import CaptureReader

REPO = Path(__file__).resolve().parents[1]
OLDEST_H5PY = re.search(r'"h5py>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
OLD_VENV = Path(os.environ.get("LATENTMAS_OLD_H5PY_VENV",
                               Path.home() / ".cache" / "latentmas-test" / f"h5py-{OLDEST_H5PY}"))
REQUIRED = os.environ.get("LATENTMAS_REQUIRE_PORTABILITY_TOOLS") == "1"  # set by .ci/run

READ = """
import json, sys
import h5py
from capture.format import CaptureReader
with CaptureReader(sys.argv[1]) as reader:
    print(json.dumps({"h5py": h5py.version.version, "numbers": reader.problem_numbers,
                      "problems": [[p.number, p.question, p.gold, p.prediction, p.correct, p.handoff_names,
                                    p.handoff_columns] for p in reader.problems()],
                      "matrix": reader.handoff(2, "critic_to_judger").layer_similarities.tolist(),
                      "tokens": reader.handoff(2, "critic_to_judger").tokens}))
"""


def _need(available: bool, what: str) -> None:
    if not available:
        if REQUIRED:
            pytest.fail(f"{what} is missing (.ci/run installs it)")
        pytest.skip(f"{what} is not installed")


def _what_current_reads(path: Path) -> dict:
    with CaptureReader(path) as reader:
        return {"numbers": reader.problem_numbers,
                "problems": [[p.number, p.question, p.gold, p.prediction, p.correct, p.handoff_names,
                              p.handoff_columns] for p in reader.problems()],
                "matrix": reader.handoff(2, "critic_to_judger").layer_similarities.tolist(),
                "tokens": reader.handoff(2, "critic_to_judger").tokens}


def test_oldest_declared_h5py_reads_a_capture_of_the_current_one(tmp_path):
    python = OLD_VENV / "bin" / "python"
    _need(python.exists(), f"a venv with h5py {OLDEST_H5PY} at {OLD_VENV}")
    path = valid_capture(tmp_path / "run.h5")
    proc = subprocess.run([str(python), "-c", READ, str(path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    old = json.loads(proc.stdout)
    assert old.pop("h5py").startswith(OLDEST_H5PY)
    assert old == _what_current_reads(path)
    assert np.asarray(old["matrix"]).shape == (3, 9)


def test_a_file_from_a_newer_hdf5_is_named_as_such(tmp_path, monkeypatch):
    """A file with HDF5 2.0 object headers (libver='latest' under HDF5 2) read by the oldest h5py."""
    python = OLD_VENV / "bin" / "python"
    _need(python.exists(), f"a venv with h5py {OLDEST_H5PY} at {OLD_VENV}")
    if not h5py.version.hdf5_version.startswith("2."):
        pytest.skip("needs HDF5 2 to write a file that HDF5 1.x cannot read")
    import capture.format

    monkeypatch.setattr(capture.format, "LIBVER", "latest")  # what the writer did before
    newer = valid_capture(tmp_path / "newer.h5")
    script = ("import sys\nfrom capture.format import CaptureError, CaptureReader\ntry:\n    CaptureReader(sys.argv[1])\n"
              "except CaptureError as error:\n    sys.exit(str(error))\n")
    proc = subprocess.run([str(python), "-c", script, str(newer)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "written by a newer HDF5" in proc.stderr
    assert "upgrade h5py" in proc.stderr and "not a LatentMAS capture" not in proc.stderr


def test_h5dump_lists_every_dataset(tmp_path):
    _need(shutil.which("h5dump") is not None, "h5dump (Debian hdf5-tools)")
    path = valid_capture(tmp_path / "run.h5")
    proc = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in (proc.stdout + proc.stderr).lower(), proc.stderr
    listed = set(re.findall(r'DATASET "(\w+)"', proc.stdout))
    with h5py.File(path, "r") as f:
        datasets = set()
        f.visititems(lambda name, obj: datasets.add(name.split("/")[-1]) if isinstance(obj, h5py.Dataset) else None)
    assert datasets and listed == datasets
