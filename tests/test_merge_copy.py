"""The merge of a sharded capture copies rows in blocks (`CaptureWriter.copy_problems`): the merged file
holds exactly what the sources hold (every table, the readout too), in problem-number order, whatever
order the sources keep their problems in; bad sources are refused in one line; a merge killed at any
write leaves the capture file and the shards as they were."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_readout_layout import _problem as readout_problem
from test_readout_layout import _write_schema_2

from capture import merge
from capture.format import (
    LATENT_TOKEN,
    CaptureError,
    CaptureReader,
    CaptureWriter,
    Handoff,
    LatentReadout,
    ProblemRecord,
    Segment,
)

REPO = Path(__file__).resolve().parents[1]
K = 3
CONFIG = {"synthetic": 1}


def _problem(number: int, k: int = K) -> ProblemRecord:
    """Problem `number`: 0 to 3 hand-offs of 2 layers and varied widths (one of 0 columns, one without
    segments or latent columns), float32 matrices with a NaN, tokens with non-ASCII text."""
    rng = np.random.default_rng(number)
    handoffs = []
    for i in range(number % 4):
        width = 0 if (number, i) == (7, 1) else int(rng.integers(3, 40))
        latent = min(width, 0 if i == 2 else 3)
        sims = rng.uniform(-1, 1, (2, width)).astype(np.float32)
        if width:
            sims[1, 0] = np.nan
        tokens = [f"t{number}.{c} é中" for c in range(width - latent)] + [LATENT_TOKEN] * latent
        readout = LatentReadout.empty(width, k) if k else None
        for step, c in enumerate(range(width - latent, width)):
            if readout is not None:
                readout.step[c], readout.ids[c] = step, rng.integers(0, 500, k)
                readout.tokens[c] = [f"r{number}.{c}.{j}" for j in range(k)]
                readout.probs[c], readout.entropy[c] = np.linspace(0.5, 0.1, k), 0.5 + c
                readout.realign_token[c] = f"near{c}"
        segments = [] if i == 2 else [Segment("planner", "prompt", 0, width - latent),
                                      Segment("planner", "latent", width - latent, width)]
        handoffs.append(Handoff(["planner", "critic", "refiner"][i], ["critic", "refiner", "judger"][i], sims,
                                np.arange(width) * 3 + number, tokens, segments, readout))
    correct = None if number % 5 == 0 else bool(number % 2)
    return ProblemRecord(number, f"question {number} ü?", str(number), f"pred {number}", correct, handoffs)


def _write(path: Path, numbers, k: int = K, config=CONFIG, batch: int = 2) -> None:
    with CaptureWriter.open(path, {"model_name": "m", "source": path.name}, config, 2, "float32", overwrite=True,
                            durable=False, readout_top_k=k) as writer:
        for start in range(0, len(numbers), batch):
            writer.append_batch([_problem(n, k) for n in numbers[start:start + batch]])


def _contents(path: Path) -> dict:
    """Everything a reader shows of each problem, by number, and the problem order."""
    with CaptureReader(path) as reader:
        out = {"order": reader.problem_numbers, "k": reader.readout_top_k}
        for number in reader.problem_numbers:
            rows = []
            for h in reader.handoffs(number):
                r = h.readout
                rows.append((h.from_agent, h.to_agent, h.layer_similarities.tobytes(), h.layer_similarities.dtype,
                             h.positions.tolist(), h.tokens, h.segments,
                             None if r is None else (r.step.tolist(), r.ids.tolist(), r.tokens, r.probs.tobytes(),
                                                     r.entropy.tobytes(), r.realign_cosine.tobytes(),
                                                     r.realign_token)))
            out[number] = (reader.problem(number), rows)
        return out


@pytest.fixture
def sources(tmp_path) -> Path:
    """A capture file and three shards as an interrupted run leaves them: shard 1 out of number order,
    problem 5 in the capture file and in shard 2 (the capture file's is taken)."""
    capture_file = tmp_path / "run.h5"
    _write(capture_file, [2, 5, 9])
    _write(merge.shard_path(capture_file, 0), [1, 4, 7, 10, 13, 16, 19], batch=3)
    _write(merge.shard_path(capture_file, 1), [14, 3, 20, 8, 11, 6], batch=1)
    _write(merge.shard_path(capture_file, 2), [5, 12, 15, 17, 18])
    return capture_file


def _expected(capture_file: Path) -> dict:
    """Each problem as the first source holding it shows it."""
    want = {}
    for path in merge.sources(capture_file):
        for number, value in _contents(path).items():
            if isinstance(number, int):
                want.setdefault(number, value)
    return want


def test_bulk_merge_holds_exactly_what_the_sources_hold_in_number_order(sources, monkeypatch):
    want = _expected(sources)
    records = sources.parent / "records"
    shutil.copytree(sources.parent, records, ignore=shutil.ignore_patterns("records"))
    monkeypatch.setattr(merge, "MERGE_BATCH", 4)  # several commits, each mixing sources
    stats = merge.merge(sources, summarize=lambda s: {"total": s.total, "correct": s.correct})
    got = _contents(sources)
    assert got["order"] == list(range(1, 21)) == stats.numbers
    assert {n: got[n] for n in got["order"]} == want
    assert not merge.shard_dir(sources).exists()
    with CaptureReader(sources) as reader:
        assert reader.summary == {"total": 20, "correct": sum(bool(want[n][0].correct) for n in want)}
        assert reader.attrs["source"] == "run.h5" and reader.similarity_dtype == "float32"
    # the same as the per-problem merge it replaced, dataset for dataset
    merge.merge(records / "run.h5", summarize=lambda s: {"total": s.total, "correct": s.correct}, bulk=False)
    with h5py.File(sources, "r") as a, h5py.File(records / "run.h5", "r") as b:
        names = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert len(names) > 20
        for name in names:
            if name != "status/finished_at":
                assert np.array_equal(a[name][()], b[name][()], equal_nan=a[name].dtype.kind == "f"), name


def test_merge_of_sources_without_a_readout(tmp_path):
    capture_file = tmp_path / "run.h5"
    _write(merge.shard_path(capture_file, 0), [1, 3, 5], k=0)
    _write(merge.shard_path(capture_file, 1), [2, 4, 6, 7], k=0)
    want = _expected(capture_file)
    merge.merge(capture_file)
    got = _contents(capture_file)
    assert got["order"] == list(range(1, 8)) and got["k"] == 0
    assert {n: got[n] for n in got["order"]} == want


def test_schema_2_source_with_a_readout_is_merged_through_records(tmp_path):
    capture_file = tmp_path / "run.h5"
    _write_schema_2(capture_file, numbers=(1, 2))
    with CaptureWriter.open(merge.shard_path(capture_file, 0), {}, {"a": 1}, num_layers=2, readout_top_k=2,
                            durable=False) as writer:
        writer.append(readout_problem(3))
    want = _expected(capture_file)
    merge.merge(capture_file)
    got = _contents(capture_file)
    assert got["order"] == [1, 2, 3] and {n: got[n] for n in got["order"]} == want
    with h5py.File(capture_file, "r") as f:
        assert f.attrs["schema_version"] == 3


def test_shard_with_another_readout_k_is_refused(tmp_path):
    capture_file = tmp_path / "run.h5"
    _write(merge.shard_path(capture_file, 0), [1, 2])
    _write(merge.shard_path(capture_file, 1), [3], k=2)
    with pytest.raises(CaptureError, match=r"rank-00001\.h5 into .*top 2 tokens"):
        merge.merge(capture_file)
    assert not capture_file.exists() and len(merge.shard_files(capture_file)) == 2


def test_shard_with_a_token_that_is_not_utf8_is_refused(tmp_path):
    capture_file = tmp_path / "run.h5"
    _write(merge.shard_path(capture_file, 0), [1, 2, 3])
    with h5py.File(merge.shard_path(capture_file, 0), "r+") as f:
        f["columns/token"][2] = b"bad \xff"
    with pytest.raises(CaptureError, match=r"rank-00000\.h5 is damaged: /columns/token is not valid UTF-8"):
        merge.merge(capture_file)
    assert not capture_file.exists() and merge.shard_path(capture_file, 0).exists()


KILLED_MERGE = textwrap.dedent("""
    import sys
    from capture import merge
    merge.MERGE_BATCH = 3
    merge.merge(sys.argv[1], summarize=lambda stats: {"total": stats.total})
    print("merged")
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")
def test_merge_killed_at_a_write_leaves_everything_as_it_was(sources, tmp_path):
    want = _expected(sources)
    before = {p.name: p.read_bytes() for p in merge.sources(sources)}
    script = [sys.executable, "-c", KILLED_MERGE, str(sources)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for call, when in (("pwrite64", 1), ("pwrite64", 40), ("pwrite64", 200), ("fsync", 2), ("rename", 1)):
        killed = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e",
                                 f"inject={call}:signal=KILL:when={when}", *script], capture_output=True, text=True,
                                timeout=120, env=env)
        assert killed.returncode != 0 and "merged" not in killed.stdout, (call, when, killed.stderr[-2000:])
        assert {p.name: p.read_bytes() for p in merge.sources(sources)} == before, (call, when)
    done = subprocess.run(script, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    got = _contents(sources)
    assert got["order"] == list(range(1, 21)) and {n: got[n] for n in got["order"]} == want
