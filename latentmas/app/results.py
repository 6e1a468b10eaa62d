"""`results.jsonl`: one JSON line per problem, written through per-rank parts.

Every rank of a run (one process is rank 0 of 1) appends each finished batch to its own part,
`<run dir>/results.shards/rank-0000R.jsonl`. At the end rank 0 merges the parts, and the
results.jsonl of an earlier run that this one resumes, into results.jsonl: one line per
problem, in number order, written to a temporary file, fsynced and swapped in with
`os.replace`. results.jsonl is never rewritten in place, so a kill at any moment leaves either
the old file or the new one, and the parts of an interrupted run are kept for the rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

from capture.format import sync_folder

PARTS = "results.shards"  # per-rank results, inside the run's output folder
RESULTS = "results.jsonl"


def part_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / PARTS / f"rank-{rank:05d}.jsonl"


def part_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / PARTS).glob("rank-*.jsonl"))


def jsonl(result) -> str:
    """One results.jsonl line of a `ProblemResult`."""
    return json.dumps(dataclasses.asdict(result), ensure_ascii=False) + "\n"


def trim_torn_line(path: Path) -> int:
    """Cut a last line without its newline (a writer killed mid-line); return the new size."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return keep


def prepare_parts(run_dir: Path, resuming: bool) -> dict[str, int]:
    """Before any rank writes: keep an interrupted run's parts when resuming (minus a torn last line),
    else delete them. Returns each kept part's size (where the progress bar starts reading it)."""
    folder = Path(run_dir) / PARTS
    folder.mkdir(parents=True, exist_ok=True)
    offsets = {}
    for part in part_files(run_dir):
        if resuming:
            offsets[part.name] = trim_torn_line(part)
        else:
            part.unlink()
    return offsets


def _records(path: Path):
    """(number, line, record) of each readable line of a results file; torn or foreign lines are skipped."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            yield int(record["number"]), line, record
        except (ValueError, KeyError, TypeError):
            continue


def merge_results(run_dir: Path, keep: set[int] | None) -> list[dict]:
    """Merge the parts (and, for the problems in `keep`, the existing results.jsonl) into results.jsonl.

    keep: the numbers an earlier run finished that this one resumes (None: nothing is resumed,
    the old results.jsonl is replaced). A problem found twice is taken from the parts (this run,
    or the interrupted run it resumes) first. Returns the records in number order.
    """
    run_dir = Path(run_dir)
    lines: dict[int, tuple[str, dict]] = {}
    for part in part_files(run_dir):
        for number, line, record in _records(part):
            lines.setdefault(number, (line, record))
    if keep:
        for number, line, record in _records(run_dir / RESULTS):
            if number in keep:
                lines.setdefault(number, (line, record))
    ordered = [lines[n] for n in sorted(lines)]
    write_atomically(run_dir / RESULTS, "".join(line + "\n" for line, _ in ordered))
    for part in part_files(run_dir):
        part.unlink()
    with contextlib.suppress(OSError):
        (run_dir / PARTS).rmdir()
    return [record for _, record in ordered]


def write_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file, fsynced, then `os.replace` (and the folder fsynced)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)
