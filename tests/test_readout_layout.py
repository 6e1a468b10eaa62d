"""How the capture stores the latent readout: schema 3's row table (one row per latent column), the
older per-column layout of schema 2 still read (and resumed) into the same `LatentReadout`, staged
rows invisible until committed, and damaged or crafted readout tables refused in one line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from capture.format import CaptureError, CaptureReader, CaptureWriter, Handoff, LatentReadout, ProblemRecord, Segment

K = 2
STR = h5py.string_dtype("utf-8")


def _readout(width: int, columns, seed: int) -> LatentReadout:
    """A readout of `width` columns, `columns` of which (latent steps 0, 1, ...) have one."""
    rng = np.random.default_rng(seed)
    readout = LatentReadout.empty(width, K)
    for step, c in enumerate(columns):
        readout.step[c] = step
        readout.ids[c] = rng.integers(0, 1000, K)
        readout.tokens[c] = [f"w{seed}.{c}.{i}" for i in range(K)]
        readout.probs[c] = [0.5, 0.25]
        readout.entropy[c] = 1.0 + c
        readout.realign_cosine[c] = 0.1 * c
        readout.realign_token[c] = f"near{c}"
    return readout


def _problem(number: int) -> ProblemRecord:
    """Two hand-offs: 6 columns (latent 4, 5), then 9 (latent 4, 5 and 7, 8)."""
    handoffs = []
    for width, latent, (a, b) in ((6, [4, 5], ("planner", "critic")), (9, [4, 5, 7, 8], ("critic", "judger"))):
        tokens = ["<latent>" if c in latent else f"t{c}" for c in range(width)]
        handoffs.append(Handoff(a, b, np.full((2, width), 0.5, np.float32), np.arange(width), tokens,
                                [Segment(a, "prompt", 0, width)], _readout(width, latent, 10 * number + width)))
    return ProblemRecord(number, f"q{number}", "1", "1", True, handoffs)


def _write(path, numbers=(1, 2)):
    with CaptureWriter.open(path, {"model_name": "m"}, {"a": 1}, num_layers=2, readout_top_k=K,
                            durable=False) as writer:
        writer.append_batch([_problem(n) for n in numbers])
    return path


def _assert_same_readout(got: LatentReadout, want: LatentReadout) -> None:
    np.testing.assert_array_equal(got.has, want.has)
    np.testing.assert_array_equal(got.step, want.step)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.probs, want.probs)
    np.testing.assert_array_equal(got.entropy, want.entropy)
    np.testing.assert_array_equal(got.realign_cosine, want.realign_cosine)
    assert got.tokens == want.tokens and got.realign_token == want.realign_token


def _assert_reads(path, numbers=(1, 2)) -> None:
    with CaptureReader(path) as reader:
        assert reader.problem_numbers == list(numbers) and reader.readout_top_k == K
        for number in numbers:
            for got, want in zip(reader.handoffs(number), _problem(number).handoffs, strict=True):
                _assert_same_readout(got.readout, want.readout)


def test_only_latent_columns_are_stored(tmp_path):
    path = _write(tmp_path / "run.h5")
    _assert_reads(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 3
        assert not [name for name in f["columns"] if "readout" in name or "realign" in name]
        np.testing.assert_array_equal(f["readout/column"][:], [4, 5, 4, 5, 7, 8] * 2)
        np.testing.assert_array_equal(f["readout/step"][:], [0, 1, 0, 1, 2, 3] * 2)
        assert f["readout/id"].shape == (K, 12) and f["readout/token"].shape == (K, 12)
        np.testing.assert_array_equal(f["handoffs/first_readout"][:], [0, 2, 6, 8])
        np.testing.assert_array_equal(f["handoffs/num_readouts"][:], [2, 4, 2, 4])
        assert f["readout/token"][1, 2].decode() == _problem(1).handoffs[1].readout.tokens[4][1]


def test_staged_rows_stay_invisible_and_a_resume_appends_after_the_committed(tmp_path):
    path = _write(tmp_path / "run.h5", numbers=(1,))
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2, durable=False) as writer:
        assert writer.readout_top_k == K
        writer.stage([_problem(5).handoffs], [5])  # never committed, as after a crash
        with CaptureReader(path) as reader:
            assert reader.problem_numbers == [1]
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2, durable=False) as writer:
        writer.append(_problem(2))
    _assert_reads(path, (1, 2))


def _write_schema_2(path, numbers=(1, 2)):
    """A schema 2 capture: the tables written by CaptureWriter without a readout, then the readout added per
    column of /columns as schema 2 kept it (-1, "" and NaN where a column has none)."""
    with CaptureWriter.open(path, {"model_name": "m"}, {"a": 1}, num_layers=2, durable=False) as writer:
        writer.append_batch([_without_readout(_problem(n)) for n in numbers])
    readouts = [h.readout for n in numbers for h in _problem(n).handoffs]
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
        columns = f["columns"]
        columns["readout_step"] = np.concatenate([r.step for r in readouts]).astype(np.int32)
        columns["readout_id"] = np.concatenate([r.ids for r in readouts]).T.astype(np.int32)
        columns.create_dataset("readout_token", data=np.array([t for r in readouts for t in r.tokens], dtype=object).T,
                               dtype=STR)
        columns["readout_prob"] = np.concatenate([r.probs for r in readouts]).T.astype(np.float32)
        columns["readout_entropy"] = np.concatenate([r.entropy for r in readouts]).astype(np.float32)
        columns["realign_cosine"] = np.concatenate([r.realign_cosine for r in readouts]).astype(np.float32)
        columns.create_dataset("realign_token", data=[t for r in readouts for t in r.realign_token], dtype=STR)
    return path


def _without_readout(problem: ProblemRecord) -> ProblemRecord:
    for handoff in problem.handoffs:
        handoff.readout = None
    return problem


def test_schema_2_files_read_and_resume_into_schema_3(tmp_path):
    path = _write_schema_2(tmp_path / "old.h5")
    _assert_reads(path)
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2, durable=False) as writer:  # the resume converts
        assert writer.readout_top_k == K
        writer.append(_problem(3))
    _assert_reads(path, (1, 2, 3))
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 3 and "readout_id" not in f["columns"]
        assert f["readout/column"].shape == (18,)


def _edit(edit):
    def make(path):
        _write(path)
        with h5py.File(path, "r+") as f:
            edit(f)
    return make


def _set(name, value):
    def edit(f):
        f[name][...] = value
    return _edit(edit)


def _replace(name, **create):
    def edit(f):
        del f[name]
        f.create_dataset(name, **create)
    return _edit(edit)


HOSTILE = {
    "first_readout_beyond_rows": (_set("handoffs/first_readout", [0, 2, 6, 90]), "points at /readout rows 90..94"),
    "num_readouts_beyond_rows": (_set("handoffs/num_readouts", [2, 4, 2, 40]), "points at /readout rows 8..48"),
    "negative_first_readout": (_set("handoffs/first_readout", [0, -2, 6, 8]), "points at /readout rows -2..2"),
    "column_outside_handoff": (_set("readout/column", [4, 6] + [4, 5, 7, 8] + [4, 5, 4, 5, 7, 8]),
                               "/readout row 1 names column 6 of hand-off 0, which has 6"),
    "negative_column": (_set("readout/column", [4, 5] + [-1, 5, 7, 8] + [4, 5, 4, 5, 7, 8]),
                        "/readout row 2 names column -1"),
    "repeated_column": (_set("readout/column", [4, 5] + [4, 5, 5, 8] + [4, 5, 4, 5, 7, 8]),
                        "/readout row 4 names column 5 of hand-off 1 after column 5"),
    "negative_step": (_set("readout/step", [0, 1, 0, -1] + [0] * 8), "/readout row 3 has latent step -1"),
    "negative_token_id": (_edit(lambda f: f["readout/id"].__setitem__((1, 7), -5)),
                          "/readout/id row 7 holds -5, not a token id"),
    "column_as_text": (_replace("readout/column", data=["4"] * 12, dtype=STR), "/readout/column holds"),
    "id_rank_1": (_replace("readout/id", data=np.zeros(12, np.int32)), "/readout/id has 1 dimensions, the schema 2"),
    "prob_other_k": (_replace("readout/prob", data=np.zeros((3, 12), np.float32)), "disagree on k (2, 3)"),
    "token_k_0": (_edit(lambda f: (f.__delitem__("readout/token"),
                                   f["readout"].create_dataset("token", shape=(0, 12), dtype=STR))), "disagree on k"),
    "missing_entropy": (_edit(lambda f: f.__delitem__("readout/entropy")), "missing /readout/entropy"),
    "missing_range": (_edit(lambda f: f.__delitem__("handoffs/num_readouts")), "missing /handoffs/num_readouts"),
    "readout_a_dataset": (_edit(lambda f: (f.__delitem__("readout"), f.create_dataset("readout", data=[1]))),
                          "/readout is a dataset where the schema has a group"),
    "readout_soft_link": (_edit(lambda f: (f.move("readout", "elsewhere"), f.__setitem__("readout",
                                                                                         h5py.SoftLink("/elsewhere")))),
                          "/readout is a soft link"),
    "range_without_table": (_edit(lambda f: f.__delitem__("readout")), "missing /readout/column"),
    "rows_cut_short": (_edit(lambda f: f["readout/prob"].resize(8, axis=1)), "points at /readout rows 8..12"),
    "range_as_float": (_replace("handoffs/first_readout", data=np.zeros(4, np.float32)),
                       "/handoffs/first_readout holds float32"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_readout_tables_are_one_line(tmp_path, case):
    make, message = HOSTILE[case]
    path = tmp_path / f"{case}.h5"
    make(path)
    with pytest.raises(CaptureError) as error:
        with CaptureReader(path) as reader:
            for number in reader.problem_numbers:
                for handoff in reader.handoffs(number):
                    assert handoff.readout is not None
    text = str(error.value)
    assert "\n" not in text and path.name in text and message in text, text


def test_a_schema_2_readout_that_schema_3_refuses_is_not_converted(tmp_path):
    """A resume that would copy a readout row schema 3 refuses (a token id but no step) fails in one line
    and leaves the schema-2 file as it was, still readable."""
    import h5py

    from capture.format import CaptureError

    path = _write_schema_2(tmp_path / "old.h5")
    with h5py.File(path, "r+") as f:
        f["columns/readout_step"][4] = -1  # hand-off 0, column 4: ids kept, step lost
    before = path.read_bytes()
    with pytest.raises(CaptureError, match="schema-2 readout cannot be converted: hand-off 0: .* column 4"):
        CaptureWriter.open(path, {}, {"a": 1}, num_layers=2, durable=False)
    assert path.read_bytes() == before
    with CaptureReader(path) as reader:
        assert reader.problem_numbers == [1, 2]


def test_a_malformed_readout_is_refused_in_one_line_before_anything_is_written(tmp_path):
    from capture.format import CaptureError

    path = _write(tmp_path / "run.h5", numbers=())
    problem = _problem(1)
    readout = problem.handoffs[0].readout
    readout.ids = readout.ids[:, 0]  # [T] instead of [T, k]
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2, durable=False) as writer:
        with pytest.raises(CaptureError, match=r"hand-off planner_to_critic of problem 1 .*readout ids is"):
            writer.append(problem)
    with CaptureReader(path) as reader:
        assert reader.problem_numbers == []
