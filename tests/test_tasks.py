"""Tests of the benchmark task layer (latentmas.tasks). No network: the hub is
switched off with HF_HUB_OFFLINE=1, and the hub path is exercised with a fake
`datasets` module."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from latentmas.tasks import TASK_NAMES, Problem, Task, TaskDataError, get_task, load_problems, loading
from latentmas.tasks.choice import ChoiceTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LATENTMAS_DATA_DIR", raising=False)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GSM_RECORD = {"question": "Two plus two?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}


# --------------------------------------------------------------------------- registry


def test_registry_has_every_task() -> None:
    assert set(TASK_NAMES) == {"gsm8k", "gpqa", "medqa", "arc_easy", "arc_challenge", "aime2024", "aime2025"}
    for name in TASK_NAMES:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert "\\boxed{}" in task.answer_instruction


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(TaskDataError, match=r"unknown task 'foo'; choose from gsm8k, .*gpqa, medqa, arc_easy") as info:
        get_task("foo")
    assert "\n" not in str(info.value)
    with pytest.raises(TaskDataError, match="unknown task"):
        load_problems("foo")


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, latentmas.tasks; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- numeric extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{18}.", "18"),
        ("first \\boxed{3} then finally \\boxed{42}", "42"),
        ("\\boxed{\\text{\\$18.00}}", "18"),
        ("\\boxed{\\frac{8}{2}}", "4"),  # nested braces
        ("\\boxed{{12}}", "12"),
        ("\\boxed{3{,}000}", "3000"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{0.50}", "0.5"),
        ("\\boxed{-7}", "-7"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("She earns $18.00 a day.", "18"),
        ("The answer is 1,234 apples.", "1234"),
        ("12 + 6 = 18.0", "18"),
        ("#### 72\nthen 5 more words 6", "72"),
        ("The answer is 7, since 3 + 4 = 7 and we had 2 steps.", "7"),
        ("temperature went 3-5 degrees to -2", "-2"),
        ("\\boxed{x} and 5 apples", "5"),  # box without a number: fall back
        ("no digits at all", None),
        ("", None),
    ],
)
def test_numeric_extraction(text: str, expected: str | None) -> None:
    assert get_task("gsm8k").extract_answer(text) == expected


def test_unclosed_box_is_ignored() -> None:
    assert get_task("gsm8k").extract_answer("\\boxed{5} and \\boxed{6") == "5"


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        ("1000", "1,000", True),
        ("$1,000.00", "1000", True),
        ("18.0", "18", True),
        ("0.5", "1/2", True),
        ("17", "18", False),
        ("180", "18", False),
        (None, "18", False),
        ("eighteen", "18", False),
    ],
)
def test_numeric_comparison(prediction: str | None, gold: str, correct: bool) -> None:
    assert get_task("gsm8k").is_correct(prediction, gold) is correct


def test_aime_answers_are_integers() -> None:
    task = get_task("aime2024")
    assert task.extract_answer("Therefore the answer is \\boxed{073}.") == "73"
    assert task.is_correct("073", "73")
    assert task.parse_record({"Problem": "P", "Answer": 204}) == ("P", "204")
    assert task.parse_record({"problem": "P", "answer": "033"}) == ("P", "33")
    assert get_task("aime2025").parse_record({"question": "Q", "answer": "7"}) == ("Q", "7")
    for bad in ("1000", "2.5", "-1", "many"):
        with pytest.raises(ValueError):
            task.parse_record({"problem": "P", "answer": bad})


def test_gsm8k_parse_record() -> None:
    task = get_task("gsm8k")
    assert task.parse_record({"question": " Q? ", "answer": "work\n#### 1,000"}) == ("Q?", "1000")
    with pytest.raises(KeyError):
        task.parse_record({"question": "Q"})
    with pytest.raises(ValueError):
        task.parse_record({"question": "Q", "answer": "no final line"})


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("reasoning... \\boxed{C}", "C"),
        ("\\boxed{A} no wait \\boxed{D}", "D"),
        ("\\boxed{\\text{(b)}}", "B"),  # nested braces, lower case
        ("\\boxed{C. Colorectal cancer}", "C"),
        ("\\boxed{Option B}", "B"),
        ("Thus the answer is (C).", "C"),
        ("The answer is B because it fits.", "B"),
        ("**Answer:** D", "D"),
        ("Answer: a)", "A"),
        ("The correct option is C", "C"),
        ("I weighed the options.\n\nB", "B"),
        ("Long reasoning.\n(D)", "D"),
        ("Long reasoning.\nA. Hemolytic uremic syndrome", "A"),
        ("c", "C"),
        ("The answer is a combination of factors", None),
        ("A patient with B symptoms", None),
        ("\\boxed{Colorectal}", None),
        ("nothing", None),
        ("", None),
    ],
)
def test_choice_extraction(text: str, expected: str | None) -> None:
    assert get_task("medqa").extract_answer(text) == expected


def test_choice_letters_are_task_specific() -> None:
    assert get_task("arc_challenge").extract_answer("Answer: E") == "E"  # ARC can have 5 options
    assert get_task("gpqa").extract_answer("Answer: E") is None  # GPQA has 4


def test_choice_comparison_is_case_insensitive() -> None:
    task = get_task("arc_easy")
    assert task.is_correct("c", "C")
    assert task.is_correct("(C)", "C")
    assert not task.is_correct("B", "C")
    assert not task.is_correct(None, "C")


def test_gpqa_shuffle_is_deterministic_and_varied() -> None:
    task = get_task("gpqa")
    record = {"Question": "Pick", "Correct Answer": "right"}
    record.update({f"Incorrect Answer {i}": f"w{i}" for i in (1, 2, 3)})
    golds = set()
    for index in range(20):
        question, gold = task.parse_record(record, index=index, seed=0)
        assert task.parse_record(record, index=index, seed=0) == (question, gold)
        assert f"{gold}. right" in question.splitlines()
        assert sorted(line[3:] for line in question.splitlines()[1:]) == ["right", "w1", "w2", "w3"]
        golds.add(gold)
    assert golds == {"A", "B", "C", "D"}
    seeds = {task.parse_record(record, index=0, seed=seed)[1] for seed in range(20)}
    assert len(seeds) > 1


def test_gpqa_loading_uses_seed(tmp_path: Path) -> None:
    path = ROOT / "data" / "gpqa.jsonl"
    first = load_problems("gpqa", str(path), seed=0)
    assert load_problems("gpqa", str(path), seed=0) == first
    assert [p.gold for p in load_problems("gpqa", str(path), seed=1)] != [p.gold for p in first]
    assert len({p.gold for p in first}) > 1


def test_medqa_latentmas_shape() -> None:
    """The LatentMAS copy repeats the options inside `question` and gives the answer as text."""
    options = ["A. Hemolytic uremic syndrome", "B. Oral ulcers", "C. Colorectal cancer", "D. Pancreatic cancer"]
    block = "\n".join(options)
    question = f"Stem text?\n{block}\n\n{block}"
    record = {"idx": 0, "question": question, "options": options, "answer": "Colorectal cancer"}
    question, gold = get_task("medqa").parse_record(record)
    assert gold == "C"
    assert question == "Stem text?\n" + block


def test_medqa_hub_shape() -> None:
    options = {"A": "one", "B": "two", "C": "three", "D": "four"}
    record = {"question": "Q?", "options": options, "answer": "four", "answer_idx": "D"}
    assert get_task("medqa").parse_record(record) == ("Q?\nA. one\nB. two\nC. three\nD. four", "D")
    with pytest.raises(ValueError):
        get_task("medqa").parse_record({"question": "Q?", "options": ["x", "y"], "answer": "z"})


def test_arc_shapes_agree() -> None:
    task = get_task("arc_easy")
    hf = {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    choices = [{"label": label, "text": text} for label, text in zip("ABC", "abc")]
    original = {"question": {"stem": "Q?", "choices": choices}, "answerKey": "C"}
    assert task.parse_record(hf) == task.parse_record(original) == ("Q?\nA. a\nB. b\nC. c", "C")
    with pytest.raises(KeyError):
        task.parse_record({"question": "Q?", "choices": hf["choices"]})


# --------------------------------------------------------------------------- bundled data


@pytest.mark.parametrize("name", TASK_NAMES)
def test_bundled_file_loads_and_golds_score(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    problems = load_problems(name)
    notice = capsys.readouterr().err.strip()
    using = f"using {len(problems)} bundled {name} problems from data/{name}.jsonl"
    assert notice == f"notice: hub unavailable (HF_HUB_OFFLINE=1); {using}"
    assert len(problems) >= 6
    assert [p.number for p in problems] == list(range(1, len(problems) + 1))
    task = get_task(name)
    for problem in problems:
        assert isinstance(problem, Problem)
        assert problem.source == f"bundled:data/{name}.jsonl"
        assert problem.question and problem.gold
        assert task.is_correct(task.extract_answer(f"Reasoning.\n\\boxed{{{problem.gold}}}"), problem.gold)
        if isinstance(task, ChoiceTask):
            assert "\nA. " in problem.question and "\nB. " in problem.question
    assert len({p.question for p in problems}) == len(problems)


def test_bundled_multiple_choice_golds_vary() -> None:
    for name in ("gpqa", "medqa", "arc_easy", "arc_challenge"):
        assert len({p.gold for p in load_problems(name)}) >= 3, name


def test_data_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "gsm8k.jsonl", [GSM_RECORD])
    monkeypatch.setenv("LATENTMAS_DATA_DIR", str(tmp_path))
    problems = load_problems("gsm8k")
    assert [p.gold for p in problems] == ["4"]
    assert str(tmp_path / "gsm8k.jsonl") in capsys.readouterr().err
    monkeypatch.setenv("LATENTMAS_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(TaskDataError, match="data file not found"):
        load_problems("gsm8k")


# --------------------------------------------------------------------------- file loading


def test_jsonl_loading_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GSM_RECORD) + "\n\n   \n" + json.dumps({"question": "Q2", "answer": "#### 9"}) + "\n")
    problems = load_problems("gsm8k", str(path))
    assert problems == [Problem(1, "Two plus two?", "4", f"{path}:1"), Problem(2, "Q2", "9", f"{path}:4")]


def test_json_list_and_wrapped_list_match_jsonl(tmp_path: Path) -> None:
    records = [GSM_RECORD, {"question": "Q2", "answer": "#### 9"}]
    jsonl = load_problems("gsm8k", str(write_jsonl(tmp_path / "a.jsonl", records)))
    (tmp_path / "b.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "c.json").write_text(json.dumps({"meta": {"n": 2}, "data": records}, indent=2))
    (tmp_path / "d.json").write_text(json.dumps({"questions": records}))
    for name in ("b.json", "c.json", "d.json"):
        loaded = load_problems("gsm8k", str(tmp_path / name))
        assert [(p.number, p.question, p.gold) for p in loaded] == [(p.number, p.question, p.gold) for p in jsonl]
    # pretty-printed JSON records are located by the line they start on
    sources = [p.source for p in load_problems("gsm8k", str(tmp_path / "b.json"))]
    assert sources == [f"{tmp_path / 'b.json'}:2", f"{tmp_path / 'b.json'}:6"]


def test_shared_medqa_copy_if_present() -> None:
    path = Path("/work/shared/data/medqa.json")
    if not path.exists():
        pytest.skip("no shared MedQA copy")
    problems = load_problems("medqa", str(path), max_samples=20)
    raw = json.loads(path.read_text())[:20]
    for problem, record in zip(problems, raw):
        position = next(i for i, option in enumerate(record["options"]) if option.endswith(record["answer"]))
        assert problem.gold == "ABCD"[position]
        assert problem.question.count("\nA. ") == 1


def test_max_samples(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": f"Q{i}", "answer": f"#### {i}"} for i in range(5)])
    assert len(load_problems("gsm8k", str(path))) == 5
    assert len(load_problems("gsm8k", str(path), max_samples=-1)) == 5
    cut = load_problems("gsm8k", str(path), max_samples=2)
    assert [(p.number, p.gold) for p in cut] == [(1, "0"), (2, "1")]
    assert load_problems("gsm8k", str(path), max_samples=0) == []
    assert len(load_problems("gsm8k", str(path), max_samples=99)) == 5
    assert len(load_problems("gsm8k", max_samples=3)) == 3


# --------------------------------------------------------------------------- bad input


def assert_one_line(error: pytest.ExceptionInfo[TaskDataError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(TaskDataError) as info:
        load_problems("gsm8k", str(path))
    assert assert_one_line(info) == f"data file not found: {path}"


def test_malformed_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GSM_RECORD) + "\n\n" + '{"question": "Q", "answer": \n' + json.dumps(GSM_RECORD) + "\n")
    with pytest.raises(TaskDataError) as info:
        load_problems("gsm8k", str(path))
    assert assert_one_line(info).startswith(f"{path}:3: not valid JSON (")


def test_malformed_json_document_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('[\n  {"question": "Q",\n   "answer": "#### 1",}\n]\n')
    with pytest.raises(TaskDataError) as info:
        load_problems("gsm8k", str(path))
    assert assert_one_line(info).startswith(f"{path}:3: not valid JSON (")


def test_missing_field_names_line_field_and_task(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [GSM_RECORD, GSM_RECORD, {"question": "Q"}])
    with pytest.raises(TaskDataError) as info:
        load_problems("gsm8k", str(path))
    assert assert_one_line(info) == f"{path}:3: missing field 'answer' for task gsm8k"


def test_bad_field_value_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "P", "answer": "1234"}])
    with pytest.raises(TaskDataError) as info:
        load_problems("aime2025", str(path))
    assert assert_one_line(info).startswith(f"{path}:1: bad record for task aime2025 (")


def test_bad_record_past_the_cut_is_still_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [GSM_RECORD, {"question": "Q"}])
    with pytest.raises(TaskDataError, match=r":2: missing field 'answer'"):
        load_problems("gsm8k", str(path), max_samples=1)


def test_non_object_record(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("[1, 2]")
    with pytest.raises(TaskDataError, match=r"p.json:1: expected a JSON object, got int"):
        load_problems("gsm8k", str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]", '{"data": []}'])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(TaskDataError) as info:
        load_problems("gsm8k", str(path))
    message = assert_one_line(info)
    assert message.startswith(f"{path}: ") and ("empty" in message)


# --------------------------------------------------------------------------- hub path


def fake_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[dict] | Exception) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(dataset_id: str, config: str | None, split: str) -> list[dict]:
        calls.append((dataset_id, config, split))
        if isinstance(rows, Exception):
            raise rows
        return rows

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda dataset_id, timeout=2.0: True)
    return calls


def test_hub_records_are_parsed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = fake_datasets(monkeypatch, [GSM_RECORD, {"question": "Q2", "answer": "#### 9"}])
    problems = load_problems("gsm8k", max_samples=1)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert problems == [Problem(1, "Two plus two?", "4", "hub:openai/gsm8k")]
    assert capsys.readouterr().err == ""


def test_hub_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_datasets(monkeypatch, RuntimeError("boom"))
    for name in TASK_NAMES:
        load_problems(name)
    assert sorted(calls, key=str) == sorted([
        ("openai/gsm8k", "main", "test"),
        ("Idavidrein/gpqa", "gpqa_diamond", "train"),
        ("GBaker/MedQA-USMLE-4-options", None, "test"),
        ("allenai/ai2_arc", "ARC-Easy", "test"),
        ("allenai/ai2_arc", "ARC-Challenge", "test"),
        ("HuggingFaceH4/aime_2024", None, "train"),
        ("yentinglin/aime_2025", None, "train"),
    ], key=str)


def test_hub_failure_falls_back(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake_datasets(monkeypatch, ConnectionError("no route"))
    problems = load_problems("arc_easy")
    assert problems[0].source == "bundled:data/arc_easy.jsonl"
    err = capsys.readouterr().err
    assert err.startswith("notice: hub unavailable (ConnectionError") and err.count("\n") == 1


def test_unreachable_hub_skips_datasets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = fake_datasets(monkeypatch, [GSM_RECORD])
    monkeypatch.setattr(loading, "_hub_reachable", lambda dataset_id, timeout=2.0: False)
    assert load_problems("gsm8k")[0].source.startswith("bundled:")
    assert calls == []
    assert "cannot reach the hub" in capsys.readouterr().err


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_switches_skip_the_hub(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    calls = fake_datasets(monkeypatch, [GSM_RECORD])
    monkeypatch.setenv(variable, "1")
    assert load_problems("gsm8k")[0].source.startswith("bundled:")
    assert calls == []


def test_probe_fails_fast_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener that accepts but never replies (like a silent proxy) must not hold the loader."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        start = time.monotonic()
        assert loading._hub_reachable("openai/gsm8k", timeout=0.5) is False
        assert time.monotonic() - start < 1.5
    finally:
        server.close()


def test_probe_accepts_any_http_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            seen.append(self.path)
            self.send_response(401)  # gated datasets answer 401
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert loading._hub_reachable("Idavidrein/gpqa", timeout=2.0) is True
        assert seen == ["/api/datasets/Idavidrein/gpqa"]
    finally:
        server.shutdown()
        server.server_close()
