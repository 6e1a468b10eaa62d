"""Loading problems: from a JSON/JSONL file, from the Hugging Face hub, or
from the small bundled sample files in `<repo>/data/` (shipped in the package as
`latentmas/sample_data/`).

The hub is tried only when the optional `datasets` package is importable (the
`[hub]` extra: `pip install "latentmas[hub]"`), the offline switches are off and
the hub answers an HTTP probe within about two seconds; anything else falls back
to the bundled file with a one-line notice on stderr. `problem_origin` says which
source a loaded list came from, for the run summary and the capture metadata.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .base import Problem, Task, TaskDataError, get_task

Located = tuple[str, Any]  # (location for messages, e.g. "data.jsonl:3", raw record)

_LIST_KEYS = ("data", "questions", "problems", "test", "examples", "items", "records", "rows", "train")
_HUB_PROBE_SECONDS = 2.0


# --------------------------------------------------------------------------- files



def _skip(text: str, pos: int, chars: str = " \t\r\n") -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _array_items(text: str, path: str, start: int) -> list[Located]:
    """Elements of the (already validated) JSON array at `start`, each located by its first line."""
    decoder, items = json.JSONDecoder(), []
    pos = _skip(text, start + 1)
    while text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        item, pos = decoder.raw_decode(text, pos)
        items.append((f"{path}:{line}", item))
        pos = _skip(text, pos, " \t\r\n,")
    return items


def _member_starts(text: str) -> dict[str, int]:
    """Offsets where each top-level member value of the (validated) JSON object starts."""
    decoder, starts = json.JSONDecoder(), {}
    pos = _skip(text, text.index("{") + 1)
    while text[pos] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, _skip(text, pos) + 1)  # past the colon
        starts[key] = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos, " \t\r\n,")
    return starts


def _jsonl_items(text: str, path: str) -> list[Located]:
    """One record per non-blank line."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise TaskDataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return items


def read_records(path: str | os.PathLike[str], display: str | None = None) -> list[Located]:
    """Raw records of a JSONL file, a JSON list, or a JSON object holding a list
    under a common key ("data", "questions", "test", ...).

    `display` is the path used in messages (defaults to `path` as given).
    """
    shown = display or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskDataError(f"data file not found: {shown}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TaskDataError(f"{shown}: cannot read file ({error or type(error).__name__})") from None
    if not text.strip():
        raise TaskDataError(f"{shown}: file is empty; expected JSON or JSONL problem records")
    items = _json_document(text, shown)
    if items is None:
        items = _jsonl_items(text, shown)
    if not items:
        raise TaskDataError(f"{shown}: no problem records found (empty list)")
    return items


def _json_document(text: str, shown: str) -> list[Located] | None:
    """Records of a whole-file JSON list or object; None when the file looks like JSONL."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole_error:
        first_line = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first_line)
        except json.JSONDecodeError:  # not JSONL either: report the whole-file error
            raise TaskDataError(f"{shown}:{whole_error.lineno}: not valid JSON ({whole_error.msg})") from None
        return None
    if isinstance(document, list):
        return _array_items(text, shown, text.index("["))
    if not isinstance(document, dict):
        raise TaskDataError(f"{shown}:1: expected a JSON object or list, got {type(document).__name__}")
    for key in _LIST_KEYS:
        if isinstance(document.get(key), list):
            return _array_items(text, shown, _member_starts(text)[key])
    return [(f"{shown}:{text.count(chr(10), 0, text.index('{')) + 1}", document)]  # a single record


# --------------------------------------------------------------------------- hub


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _datasets_installed() -> bool:
    if "datasets" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _hub_reachable(dataset_id: str, timeout: float = _HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers an HTTP HEAD for the dataset within `timeout` seconds.

    Any HTTP status counts as an answer (a gated dataset answers 401). The probe
    runs in a daemon thread so a slow DNS lookup or a silent proxy cannot hold
    us past the deadline.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/datasets/{dataset_id}", method="HEAD")
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:  # noqa: BLE001 - unreachable for any reason
            answered.clear()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_records(task: Task) -> tuple[list[Located] | None, str]:
    """(records, "") from the hub, or (None, reason) when the hub cannot be used."""
    if task.hub is None:
        return None, "no hub dataset for this task"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_on(name):
            return None, f"{name}=1"
    if not _datasets_installed():
        return None, "the 'datasets' package is not installed: pip install \"latentmas[hub]\""
    if not _hub_reachable(task.hub.dataset_id):
        return None, "cannot reach the hub"
    hub = task.hub
    try:
        import datasets  # optional dependency, imported only here

        rows = datasets.load_dataset(hub.dataset_id, hub.config, split=hub.split)
        return [(f"hub:{hub.dataset_id} row {i}", dict(row)) for i, row in enumerate(rows)], ""
    except Exception as error:  # noqa: BLE001 - any hub failure means "use the bundled file"
        return None, f"{type(error).__name__} from datasets"


# --------------------------------------------------------------------------- problems


SAMPLE_PACKAGE = "latentmas.sample_data"  # a link to the repo's `data/`, shipped inside the package


def _shipped_data_dir() -> Path | None:
    """Where the installed package keeps the bundled samples (`latentmas/sample_data/`), if it has them."""
    try:
        spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if any(Path(location).glob("*.jsonl")):
            return Path(location)
    return None


def data_dir() -> Path:
    """Directory of the bundled sample files: $LATENTMAS_DATA_DIR, else the installed package's
    `latentmas/sample_data/` (a `pip install .` ships the repo's `data/` there; an editable
    install maps it to `data/`), else `<repo>/data` of a source checkout."""
    override = os.environ.get("LATENTMAS_DATA_DIR")
    if override:
        return Path(override)
    return _shipped_data_dir() or Path(__file__).resolve().parents[2] / "data"


def bundled_file(task: Task) -> tuple[Path, str]:
    """(path, display name) of a task's bundled sample file."""
    path = data_dir() / f"{task.name}.jsonl"
    display = str(path) if os.environ.get("LATENTMAS_DATA_DIR") else f"data/{task.name}.jsonl"
    return path, display


def to_problems(
    task: Task, records: list[Located], max_samples: int = -1, seed: int = 0, source: str | None = None
) -> list[Problem]:
    """Parse every record (so bad data is reported even past the cut), then keep the first `max_samples`.

    Each problem's source is `source` when given, else the record's location.
    """
    parsed: list[tuple[str, str, str]] = []
    for index, (where, record) in enumerate(records):
        if not isinstance(record, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        try:
            question, gold = task.parse_record(record, index=index, seed=seed)
        except KeyError as error:
            raise TaskDataError(f"{where}: missing field {error.args[0]!r} for task {task.name}") from None
        except (ValueError, TypeError, AttributeError) as error:
            raise TaskDataError(f"{where}: bad record for task {task.name} ({error or type(error).__name__})") from None
        parsed.append((question, gold, source or where))
    if max_samples >= 0:
        parsed = parsed[:max_samples]
    return [Problem(number, question, gold, origin) for number, (question, gold, origin) in enumerate(parsed, start=1)]


def load_problems(
    task: Task | str, data_file: str | None = None, max_samples: int = -1, seed: int = 0
) -> list[Problem]:
    """Problems of `task` from `data_file`, else the hub, else the bundled sample file.

    `max_samples=-1` keeps all; otherwise the first N. `seed` only affects
    tasks that shuffle options (GPQA).
    """
    task = get_task(task) if isinstance(task, str) else task
    if data_file is not None:
        return to_problems(task, read_records(data_file), max_samples, seed)
    records, reason = hub_records(task)
    if records is not None:
        return to_problems(task, records, max_samples, seed, source=f"hub:{task.hub.dataset_id}")
    path, display = bundled_file(task)
    problems = to_problems(task, read_records(path, display), max_samples, seed, source=f"bundled:{display}")
    count = f"{len(problems)} bundled {task.name} problems"
    print(f"notice: hub unavailable ({reason}); using {count} from {display}", file=sys.stderr)
    return problems


def problem_origin(problems: list[Problem]) -> dict[str, Any]:
    """{"problem_source": where `problems` came from, "problem_count": how many} for summaries and
    capture metadata, so a bundled fallback cannot pass for the real dataset.

    problem_source: "hub:<dataset id>", "bundled:data/<task>.jsonl" (the few sample problems used
    when the hub is unavailable) or the data file's path; several, joined by ", ", if mixed; "none"
    for an empty list.
    """
    sources: dict[str, None] = {}
    for problem in problems:
        source = problem.source
        if not source.startswith(("hub:", "bundled:")):
            source = re.sub(r":\d+$", "", source)  # "path:LINE" -> "path"
        sources.setdefault(source, None)
    return {"problem_source": ", ".join(sources) or "none", "problem_count": len(problems)}
