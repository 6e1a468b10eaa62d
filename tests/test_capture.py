"""Capture stage: what lands in the HDF5 file, streaming, resume, batches, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
from captures import StageAtTheEnd, assert_same_handoffs, solve_and_capture, tiny_config

from capture.format import LATENT_TOKEN, CaptureError, CaptureReader, CaptureWriter, Handoff, ProblemRecord
from capture.recorder import CaptureRecorder
from latentmas.app.recording import open_recorder
from latentmas.methods import get_method
from latentmas.methods.common import encode
from latentmas.prompts import AGENTS, agent_prompt
from latentmas.tasks import get_task, load_problems

ROOT = Path(__file__).resolve().parents[1]
TRANSITIONS = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger")


_config = partial(tiny_config, latent_steps=4)


@pytest.fixture(scope="module")
def gsm8k_problems(offline):
    return load_problems("gsm8k", max_samples=3)


def test_capture_holds_every_handoff_with_cache_context(tiny_lm, gsm8k_problems, tmp_path):
    cfg = _config()
    path = tmp_path / "run.h5"
    solve_and_capture(tiny_lm, gsm8k_problems, cfg, path, batch_size=1, transitions=TRANSITIONS)
    task = get_task("gsm8k")
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2, 3]
        assert capture.attrs["num_layers"] == tiny_lm.num_layers
        assert capture.finished_at
        for problem in gsm8k_problems:
            handoffs = list(capture.handoffs(problem.number))
            assert [h.name for h in handoffs] == list(TRANSITIONS)
            # what each agent wrote into the cache: its prompt, then its latent steps
            expected_tokens: list[str] = []
            for agent, handoff in zip(AGENTS, handoffs):
                prompt = agent_prompt(agent, problem.question, task.answer_instruction)
                _, ids, _ = encode(tiny_lm, [prompt], think=False)
                expected_tokens += [tiny_lm.tokenizer.decode([i]) for i in ids[0].tolist()]
                expected_tokens += [LATENT_TOKEN] * cfg.latent_steps
                T = len(expected_tokens)
                assert handoff.layer_similarities.shape == (tiny_lm.num_layers, T)
                assert np.all(np.abs(handoff.layer_similarities.astype(np.float32)) <= 1.0 + 1e-3)
                assert handoff.tokens == expected_tokens
                np.testing.assert_array_equal(handoff.positions, np.arange(T))
                # segments tile the columns: prompt then latent, agent by agent
                assert handoff.segments[0].start == 0 and handoff.segments[-1].stop == T
                assert all(a.stop == b.start for a, b in zip(handoff.segments, handoff.segments[1:]))
                for seg in handoff.segments:
                    is_latent = [t == LATENT_TOKEN for t in handoff.tokens[seg.start:seg.stop]]
                    assert all(is_latent) if seg.kind == "latent" else not any(is_latent)
                    if seg.kind == "latent":
                        assert seg.stop - seg.start == cfg.latent_steps


def test_matrices_do_not_depend_on_batch_size(tiny_lm, gsm8k_problems, tmp_path):
    cfg = _config()
    one, three = tmp_path / "bs1.h5", tmp_path / "bs3.h5"
    solve_and_capture(tiny_lm, gsm8k_problems, cfg, one, batch_size=1, transitions=TRANSITIONS)
    solve_and_capture(tiny_lm, gsm8k_problems, cfg, three, batch_size=3, transitions=TRANSITIONS)
    with CaptureReader(one) as a:
        assert a.problem_numbers == [1, 2, 3]
    assert_same_handoffs(one, three, atol=2e-3, names=TRANSITIONS)  # float16 storage: one rounding step


def test_knn_positions_leave_gaps(tiny_lm, gsm8k_problems, tmp_path):
    cfg = _config(knn_filter=True, knn_percentage=0.5, knn_min_keep=3)
    path = tmp_path / "knn.h5"
    solve_and_capture(tiny_lm, gsm8k_problems[:1], cfg, path, batch_size=1, transitions=TRANSITIONS)
    with CaptureReader(path) as capture:
        first = capture.handoff(1, "planner_to_critic")
        assert np.all(np.diff(first.positions) > 0)  # original order kept
        assert first.positions[-1] > first.num_columns - 1  # gaps where tokens were dropped
        assert first.tokens[-3:] == [LATENT_TOKEN] * 3  # the most recent always stay


def _capture_command(path: Path, samples: int, extra=()):
    return [sys.executable, "-m", "latentmas", "capture", "--model_name", "tiny-qwen3", "--device", "cpu",
            "--task", "gsm8k", "--max_samples", str(samples), "--max_new_tokens", "48", "--latent_steps", "4",
            "--capture_file", str(path), "--output_dir", str(path.parent / "runs"), *extra]


def test_kill_keeps_finished_problems_and_rerun_resumes(tmp_path, tiny_lm_cache_env):
    path = tmp_path / "killed.h5"
    env = dict(os.environ, **tiny_lm_cache_env, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(_capture_command(path, 6), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    seen = 0
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists():
            try:
                with CaptureReader(path) as capture:
                    seen = len(capture.problem_numbers)
            except CaptureError:
                seen = 0
            if seen >= 2:
                break
        time.sleep(0.05)
    assert process.poll() is None, "capture finished before it could be killed; make problems slower"
    process.send_signal(signal.SIGKILL)
    process.wait()
    with CaptureReader(path) as capture:
        survivors = capture.problem_numbers
        assert len(survivors) >= seen >= 2
        assert survivors == list(range(1, len(survivors) + 1))
        for number in survivors:
            assert len(list(capture.handoffs(number))) == 3
        assert not capture.finished_at
    # rerun the same command: finished problems are kept, the rest appended, no duplicates
    subprocess.run(_capture_command(path, 6), cwd=tmp_path, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2, 3, 4, 5, 6]
        assert capture.finished_at
        assert capture.summary["total"] == 6
    # another configuration is refused, and the file is left as it was
    refused = subprocess.run(_capture_command(path, 6, ["--latent_steps", "2"]), cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0
    assert "latent_steps: file has 4, now 2" in refused.stderr
    assert "Traceback" not in refused.stderr
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2, 3, 4, 5, 6]


def _record(number: int, width: int = 5) -> ProblemRecord:
    rng = np.random.default_rng(number)
    handoff = Handoff("planner", "critic", rng.uniform(-1, 1, (4, width)), np.arange(width),
                      ["t"] * width, [])
    return ProblemRecord(number, f"q{number}", "1", "1", True, [handoff])


def test_write_error_keeps_earlier_problems(tmp_path, monkeypatch):
    path = tmp_path / "full.h5"
    writer = CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)
    writer.append(_record(1))
    writer.append(_record(2))

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    with pytest.raises(CaptureError, match="could not write problem 3 .*No space left"):
        writer.append(_record(3))
    monkeypatch.undo()
    writer.close()
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2]
        np.testing.assert_allclose(capture.handoff(2, "planner_to_critic").layer_similarities,
                                   _record(2).handoffs[0].layer_similarities, atol=1e-3)


def test_a_batch_is_committed_whole(tmp_path, monkeypatch):
    """append_batch writes its problems in order; a failure part-way commits none of them."""
    path = tmp_path / "batch.h5"
    writer = CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)
    writer.append_batch([_record(1, width=3), _record(2, width=7)])
    real_setitem = h5py.Dataset.__setitem__
    calls = []

    def fail_late(self, *args, **kwargs):  # let the first rows of the batch land, then fail
        calls.append(self.name)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_setitem(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fail_late)
    with pytest.raises(CaptureError, match="could not write problems 3, 4 .*No space left"):
        writer.append_batch([_record(3), _record(4)])
    monkeypatch.undo()
    writer.append_batch([_record(5, width=2)])
    writer.close()
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2, 5]
        for number, width in ((1, 3), (2, 7), (5, 2)):
            handoff = capture.handoff(number, "planner_to_critic")
            assert handoff.layer_similarities.shape == (4, width)
            np.testing.assert_allclose(handoff.layer_similarities, _record(number, width).handoffs[0].layer_similarities,
                                       atol=1e-3)


def test_staged_handoffs_stay_invisible_until_commit(tmp_path):
    path = tmp_path / "staged.h5"
    writer = CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)
    writer.append(_record(1, width=3))
    abandoned = writer.stage([_record(2, width=9).handoffs], [2])  # a batch that never finishes
    with CaptureReader(path) as capture:  # SWMR: readable while the writer is open
        assert capture.problem_numbers == [1]
    staged = writer.stage([_record(3, width=4).handoffs, _record(4, width=2).handoffs], [3, 4])
    with pytest.raises(CaptureError, match="do not belong"):
        writer.commit(staged, [_record(3)])  # one problem short
    writer.commit(staged, [ProblemRecord(n, f"q{n}", "1", "1", True) for n in (3, 4)])
    with pytest.raises(CaptureError, match="do not belong"):
        writer.commit(abandoned, [_record(2)])  # staged before another commit: stale
    writer.close()
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 3, 4]
        for number, width in ((1, 3), (3, 4), (4, 2)):
            np.testing.assert_allclose(capture.handoff(number, "planner_to_critic").layer_similarities,
                                       _record(number, width).handoffs[0].layer_similarities, atol=1e-3)


def _drain(pieces, between=lambda: None):
    """Run a staging generator to its end, calling `between()` after each piece; its StagedHandoffs and
    how many pieces it took."""
    count = 0
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value, count
        count += 1
        between()


def test_staging_in_pieces_writes_a_few_chunks_a_piece_and_stays_invisible_until_commit(tmp_path, monkeypatch):
    """`stage_in_pieces` writes at most `_CHUNKS_PER_PIECE` chunks of a table a piece (a batch of wide
    hand-offs takes many pieces), nothing shows before `commit`, and the file then holds what a file
    written by `stage` holds."""
    from capture import format as capture_format

    width = 3 * capture_format._COLUMN_CHUNK + 100  # each problem's matrix spans four chunks of columns
    records = [_record(n, width=width) for n in (1, 2, 3)]
    written = []
    setitem = h5py.Dataset.__setitem__

    def counted(dataset, key, value):
        if dataset.name == "/columns/layer_similarities":
            written.append(np.shape(value)[-1])
        return setitem(dataset, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", counted)
    path = tmp_path / "pieces.h5"
    writer = CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)

    def nothing_shows():
        with CaptureReader(path) as capture:
            assert capture.problem_numbers == []

    staged, count = _drain(writer.stage_in_pieces([r.handoffs for r in records], [1, 2, 3]), nothing_shows)
    assert sum(written) == 3 * width and max(written) <= capture_format._CHUNKS_PER_PIECE * capture_format._COLUMN_CHUNK
    assert count >= len(written) >= 3
    writer.commit(staged, records)
    writer.close()
    monkeypatch.undo()
    at_once = tmp_path / "at_once.h5"
    with CaptureWriter.open(at_once, {}, {"a": 1}, num_layers=4) as other:
        other.commit(other.stage([r.handoffs for r in records], [1, 2, 3]), records)
    with CaptureReader(path) as capture, CaptureReader(at_once) as expected:
        assert capture.problem_numbers == expected.problem_numbers == [1, 2, 3]
        for number in (1, 2, 3):
            got, want = capture.handoff(number, "planner_to_critic"), expected.handoff(number, "planner_to_critic")
            np.testing.assert_array_equal(got.layer_similarities, want.layer_similarities)
            assert list(got.tokens) == list(want.tokens) and np.array_equal(got.positions, want.positions)


def test_a_commit_between_pieces_fails_the_staging_and_keeps_what_it_committed(tmp_path):
    """Staging in pieces writes past the rows committed when it began: a commit in between (which it would
    overwrite) makes its next piece fail in one line, and the file keeps that commit; a staging left
    unfinished leaves nothing behind."""
    width = 3 * 1024
    path = tmp_path / "interleaved.h5"
    writer = CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)
    slow = writer.stage_in_pieces([_record(1, width=width).handoffs], [1])
    for _ in range(3):
        next(slow)
    writer.commit(writer.stage([_record(2, width=7).handoffs], [2]), [_record(2, width=7)])
    with pytest.raises(CaptureError, match="committed while these hand-offs were staged"):
        _drain(slow)
    abandoned = writer.stage_in_pieces([_record(3, width=width).handoffs], [3])
    for _ in range(4):
        next(abandoned)
    abandoned.close()
    writer.commit(writer.stage([_record(4, width=5).handoffs], [4]), [_record(4, width=5)])
    writer.close()
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [2, 4]
        for number, width in ((2, 7), (4, 5)):
            np.testing.assert_allclose(capture.handoff(number, "planner_to_critic").layer_similarities,
                                       _record(number, width).handoffs[0].layer_similarities, atol=1e-3)


def test_writing_while_decoding_stores_what_writing_after_stores(tiny_lm, gsm8k_problems, tmp_path):
    from latentmas import decoding

    cfg = _config(max_new_tokens=decoding.OVERLAP_AFTER + 4)
    staged_early = {"during": [], "after": []}  # per batch: were the hand-offs staged before write_batch?
    for name, base in (("during", CaptureRecorder), ("after", StageAtTheEnd)):
        class Watched(base):
            def write_batch(self, results, name=name):
                staged_early[name].append(self._staged is not None)
                super().write_batch(results)

        solve_and_capture(tiny_lm, gsm8k_problems, cfg, tmp_path / f"{name}.h5", 2, Watched, transitions=TRANSITIONS)
    assert staged_early == {"during": [True, True], "after": [False, False]}  # called once per batch
    with CaptureReader(tmp_path / "during.h5") as a, CaptureReader(tmp_path / "after.h5") as b:
        assert a.problem_numbers == [1, 2, 3]
        assert all(a.problem(n) == b.problem(n) for n in a.problem_numbers)
    assert_same_handoffs(tmp_path / "during.h5", tmp_path / "after.h5", names=TRANSITIONS)


class _FailingAt:
    """Passes hand-offs on to a recorder and raises at the `n`-th one (a batch that never finishes)."""

    def __init__(self, recorder, n):
        self.recorder, self.n, self.seen = recorder, n, 0

    def on_handoff(self, event):
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("out of memory, say")
        self.recorder.on_handoff(event)

    def watch_prefill(self, event):
        return self.recorder.watch_prefill(event)


def test_a_failed_batch_leaves_nothing_for_the_next(tiny_lm, gsm8k_problems, tmp_path):
    cfg = _config()
    task = get_task(cfg.task)
    solve = get_method("latent_mas")
    clean, after_failure = tmp_path / "clean.h5", tmp_path / "after.h5"
    solve_and_capture(tiny_lm, gsm8k_problems[2:], cfg, clean, batch_size=1, transitions=TRANSITIONS)
    recorder = open_recorder(after_failure, cfg, tiny_lm, TRANSITIONS, overwrite=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        solve(tiny_lm, gsm8k_problems[:2], task, cfg, observer=_FailingAt(recorder, 2))
    recorder.write_batch(solve(tiny_lm, gsm8k_problems[2:], task, cfg, observer=recorder))
    recorder.close()
    with CaptureReader(after_failure) as b:
        assert b.problem_numbers == [3]
    assert_same_handoffs(clean, after_failure, names=TRANSITIONS)


def test_no_captured_handoff_still_writes_the_problems(tiny_lm, gsm8k_problems, tmp_path):
    cfg = _config()
    path = tmp_path / "none.h5"
    solve_and_capture(tiny_lm, gsm8k_problems, cfg, path, batch_size=2, transitions=())
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2, 3]
        assert all(list(capture.handoffs(n)) == [] for n in capture.problem_numbers)


def test_unwritable_path_is_one_clear_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(CaptureError) as error:
        CaptureWriter.open(blocked / "run.h5", {}, {}, num_layers=2)
    assert "\n" not in str(error.value) and "run.h5" in str(error.value)


def test_other_schema_and_not_hdf5_are_refused(tmp_path):
    path = tmp_path / "old.h5"
    writer = CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)
    writer.append(_record(1))
    writer.close()
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CaptureError, match="schema 99"):
        CaptureWriter.open(path, {}, {"a": 1}, num_layers=4)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
    with CaptureReader(path) as capture:  # untouched by the refusal
        assert capture.problem_numbers == [1]
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(CaptureError, match="not an HDF5 file"):
        CaptureWriter.open(text, {}, {}, num_layers=2)


def test_resume_rebuilds_from_committed_rows(tmp_path):
    path = tmp_path / "resume.h5"
    writer = CaptureWriter.open(path, {"model_name": "m"}, {"a": 1}, num_layers=4)
    writer.append(_record(1))
    writer.close()
    writer = CaptureWriter.open(path, {"model_name": "ignored"}, {"a": 1}, num_layers=4)
    assert writer.completed_numbers == {1}
    writer.append(_record(2))
    writer.close()
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2]
        assert capture.attrs["model_name"] == "m"
        for n in (1, 2):
            np.testing.assert_allclose(capture.handoff(n, "planner_to_critic").layer_similarities,
                                       _record(n).handoffs[0].layer_similarities, atol=1e-3)



def test_resume_summary_and_results_cover_the_requested_problems(tiny_lm_cache_env, offline, tmp_path,
                                                                 monkeypatch):
    from latentmas.app.run import run

    # the tiny model answers nothing right: count problems 1 and 3 as correct, so the counts mean something
    golds = [p.gold for p in load_problems("gsm8k", max_samples=5)]
    assert len(set(golds)) == 5
    task_class = type(get_task("gsm8k"))
    monkeypatch.setattr(task_class, "is_correct", lambda self, prediction, gold: gold in (golds[0], golds[2]))
    cfg = _config(max_samples=4)
    path, out = tmp_path / "resume.h5", tmp_path / "runs"
    first = run(cfg, capture_file=path, output_dir=out, progress=False)
    assert first["total"] == 4 and first["correct"] == 2
    results = out / cfg.run_name() / "results.jsonl"
    # a results line whose problem never reached the capture (killed in between) is dropped on resume
    with open(results, "a", encoding="utf-8") as f:
        f.write('{"number": 99, "correct": true}\n')
    fewer = run(_config(max_samples=2), capture_file=path, output_dir=out, progress=False)
    assert fewer["total"] == 2 and fewer["correct"] == 1 and fewer["accuracy"] == 0.5  # problems 1 and 2 only
    more = run(_config(max_samples=5), capture_file=path, output_dir=out, progress=False)
    assert more["total"] == 5 and more["resumed_problems"] == 4 and more["correct"] == 2
    numbers = [json.loads(line)["number"] for line in results.read_text().splitlines()]
    assert numbers == [1, 2, 3, 4, 5]
    with CaptureReader(path) as capture:
        correct = sum(bool(capture.problem(n).correct) for n in capture.problem_numbers)
        assert capture.summary["correct"] == more["correct"] == correct


def test_survivors_of_the_first_batch_leave_the_garbage_collector_once(tiny_lm_cache_env, offline, tmp_path,
                                                                       monkeypatch):
    """After the first committed batch, and only then, the run freezes what is alive (`app.heap`), and
    puts it back when the run is done."""
    import gc

    from latentmas.app import heap
    from latentmas.app import run as run_module

    path = tmp_path / "frozen.h5"
    committed = []

    def freeze():
        with CaptureReader(path) as capture:
            committed.append(list(capture.problem_numbers))
        return real_freeze()

    real_freeze = heap.freeze_survivors
    monkeypatch.setattr(heap, "freeze_survivors", freeze)
    run_module.run(_config(max_samples=3, generate_bs=1), capture_file=path, output_dir=tmp_path / "runs",
                   progress=False)
    assert committed == [[1]]
    assert gc.get_freeze_count() == 0


def test_batches_by_length_hold_problems_of_like_length_and_solve_them_alike(tiny_lm_cache_env, offline, tmp_path):
    """`--batch_order length`: the longest questions are batched first (the capture holds them in that
    order), and every problem is solved as in number order."""
    from latentmas.app import run as run_module

    paths = {order: tmp_path / f"{order}.h5" for order in ("number", "length")}
    for order, path in paths.items():
        run_module.run(_config(max_samples=5, generate_bs=2, batch_order=order), capture_file=path,
                       output_dir=tmp_path / order, progress=False)
    with CaptureReader(paths["number"]) as numbered, CaptureReader(paths["length"]) as by_length:
        questions = numbered.questions()
        assert numbered.problem_numbers == [1, 2, 3, 4, 5]
        longest_first = sorted(questions, key=lambda n: (-len(questions[n]), n))
        assert longest_first != [1, 2, 3, 4, 5]  # the data's order is not already by length
        assert by_length.problem_numbers == longest_first
        assert by_length.attrs["batch_order"] == "length" and numbered.attrs["batch_order"] == "number"
        for number in longest_first:
            assert by_length.problem(number).prediction == numbered.problem(number).prediction
            for got, want in zip(by_length.handoffs(number), numbered.handoffs(number), strict=True):
                assert got.name == want.name and got.tokens == want.tokens
                np.testing.assert_allclose(got.layer_similarities.astype(np.float32),
                                           want.layer_similarities.astype(np.float32), atol=1e-3, rtol=0)


def test_resume_refuses_changed_problems(tiny_lm_cache_env, offline, tmp_path):
    """Same settings and data file path, other contents: the capture is not mixed."""
    from capture import merge
    from capture.format import CaptureConfigMismatch
    from latentmas.app.recording import capture_identity
    from latentmas.app.run import run

    data = tmp_path / "mine.jsonl"

    def write(first_question):
        rows = [{"question": first_question, "answer": "#### 5"}, {"question": "What is 7 - 4?", "answer": "#### 3"}]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("What is 2 + 3?")
    cfg = _config(max_samples=2, data_file=str(data))
    path, out = tmp_path / "changed.h5", tmp_path / "runs"
    run(cfg, capture_file=path, output_dir=out, progress=False)
    write("What is 2 + 30?")
    stored = path.read_bytes()
    with pytest.raises(CaptureConfigMismatch, match="another problem 1 .*problems changed"):
        run(cfg, capture_file=path, output_dir=out, progress=False)
    assert path.read_bytes() == stored  # refused before the resume rewrote anything
    with CaptureReader(path) as capture:
        assert capture.problem_numbers == [1, 2] and capture.problem(1).question == "What is 2 + 3?"
    identity = capture_identity(cfg, TRANSITIONS, "float16")
    with pytest.raises(CaptureConfigMismatch, match="another problem 1"):
        merge.completed_numbers(path, identity, {1: "What is 2 + 30?", 2: "What is 7 - 4?"})
    assert merge.completed_numbers(path, identity, {1: "What is 2 + 3?"}) == {1, 2}


def test_empty_transitions_are_refused():
    from functools import partial

    from capture.selection import DEFAULT_TRANSITIONS, parse_transitions
    parse_transitions = partial(parse_transitions, default=DEFAULT_TRANSITIONS)

    with pytest.raises(ValueError, match="names no hand-off"):
        parse_transitions(",")
    assert parse_transitions("all") is None
    assert parse_transitions(None) == TRANSITIONS


def test_sliding_window_models_get_a_clear_error(tiny_lm):
    from latentmas.shared_cache import SharedCache

    config = tiny_lm.model.config
    saved = config.layer_types
    config.layer_types = ["sliding_attention", "full_attention"] * (len(saved) // 2)
    try:
        with pytest.raises(ValueError, match="sliding_attention layers; the shared cache supports full"):
            SharedCache(tiny_lm, 1)
        config.layer_types = None  # a config that has a window and no layer types (Mistral, Phi-3)
        config.sliding_window, config.use_sliding_window = 8, True
        with pytest.raises(ValueError, match="sliding_attention layers; the shared cache supports full"):
            SharedCache(tiny_lm, 1)
        config.use_sliding_window = False  # Qwen2's: a window size, turned off
        SharedCache(tiny_lm, 1)
    finally:
        config.layer_types = saved
        config.sliding_window = None
        config.use_sliding_window = False


def test_a_failed_staging_fails_again_in_one_line_at_write_batch(tiny_lm, gsm8k_problems, tmp_path, monkeypatch):
    """Staging that fails while the judger decodes is forgotten: write_batch stages again and gives the same error."""
    from latentmas import decoding

    cfg = tiny_config(max_new_tokens=decoding.OVERLAP_AFTER + 4)
    recorder = open_recorder(tmp_path / "run.h5", cfg, tiny_lm, overwrite=True)
    calls = []

    def full_disk(*args, **kwargs):  # staging in pieces, failing in its first
        calls.append(1)
        raise CaptureError("run.h5: no space left on device")
        yield

    monkeypatch.setattr(recorder.writer, "stage_in_pieces", full_disk)
    with pytest.raises(CaptureError, match="no space left"):
        get_method("latent_mas")(tiny_lm, gsm8k_problems[:1], get_task("gsm8k"), cfg, observer=recorder)
    with pytest.raises(CaptureError, match="no space left"):
        recorder.write_batch([type("Result", (), {"number": gsm8k_problems[0].number})()])
    assert len(calls) == 2
    recorder.close()
