"""`summary.json`: a run's accuracy and statistics, computed one way for one process or many."""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks.scoring import accuracy_fields, tally

# Statistics of the problems a run solved itself; a rerun that solves nothing keeps the stored ones.
_TIMING = ("total_time_sec", "time_per_sample_sec")


def run_summary(cfg, results: list[dict], *, solved: int, elapsed: float, resumed: int, capture_file=None,
                previous: dict | None = None, **extra) -> dict:
    """The summary over every problem of the run (`results`: one results.jsonl record each).

    Accuracy (by this project's rule and by the original's, `latentmas.tasks.scoring`) and generated
    tokens are over all of `results` (solved now or by an earlier run);
    timing is over the `solved` problems of this run, or, when it solved none, the `previous`
    summary's (so a view-only rerun keeps the statistics). `extra` is added at the end.
    """
    summary = {
        "method": cfg.method,
        "model": cfg.model_name,
        "task": cfg.task,
        **accuracy_fields(*tally(results)),
        "total": len(results),
        "total_time_sec": round(elapsed, 3),
        "time_per_sample_sec": round(elapsed / solved, 3) if solved else 0.0,
        "generated_tokens": sum(int(r.get("generated_tokens") or 0) for r in results),
    }
    if not solved and previous:
        summary.update({k: previous[k] for k in _TIMING if k in previous})
    if resumed:
        summary["resumed_problems"] = resumed
    if capture_file is not None:
        summary["capture_file"] = str(capture_file)
    return summary | extra


def read_summary(path: Path) -> dict | None:
    """The stored summary at `path`, or None when there is none (or it cannot be read)."""
    try:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None
