"""Run a method over a task's problems: batches, progress bar, results JSONL, summary, capture."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .tasks import get_task, load_problems


def default_capture_file(cfg: RunConfig) -> Path:
    return Path("captures") / f"{cfg.run_name()}.h5"


def run(
    cfg: RunConfig,
    capture_file: str | os.PathLike | None = None,
    transitions: tuple[str, ...] | None = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger"),
    overwrite: bool = False,
    output_dir: str | os.PathLike = "runs",
    progress: bool = True,
    capture_dtype: str = "float16",
) -> dict:
    """Solve the task's problems with `cfg.method`; capture hand-offs when `capture_file` is set.

    transitions: the hand-offs to capture, by name; None captures every hand-off.

    Returns the run summary (also written to `<output_dir>/<run name>/summary.json`).
    """
    from capture.recorder import CaptureRecorder

    from .methods import get_method
    from .models import load_model

    task = get_task(cfg.task)
    problems = load_problems(task, cfg.data_file, cfg.max_samples, cfg.seed)
    solve = get_method(cfg.method)
    lm = load_model(cfg.model_name, cfg.device, random_weights=cfg.random_weights, seed=cfg.seed)
    torch.manual_seed(cfg.seed)

    recorder = None
    if capture_file is not None:
        if cfg.method != "latent_mas":
            raise ValueError(f"capture needs --method latent_mas (method {cfg.method} shares no KV cache)")
        recorder = CaptureRecorder.open(capture_file, cfg, lm, transitions, overwrite, capture_dtype)
    done = recorder.completed_numbers if recorder else set()
    todo = [p for p in problems if p.number not in done]

    run_dir = Path(output_dir) / cfg.run_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.jsonl"
    results = []
    started = time.perf_counter()
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"{cfg.method} {cfg.task}",
               unit="problem", disable=not progress, dynamic_ncols=True)
    try:
        with open(results_path, "a" if done else "w", encoding="utf-8") as out:
            for start in range(0, len(todo), cfg.generate_bs):
                batch = todo[start:start + cfg.generate_bs]
                batch_results = solve(lm, batch, task, cfg, observer=recorder)
                if recorder is not None:
                    recorder.write_batch(batch_results)
                for result in batch_results:
                    out.write(json.dumps(dataclasses.asdict(result), ensure_ascii=False) + "\n")
                out.flush()
                results.extend(batch_results)
                bar.update(len(batch))
                postfix = {"acc": f"{sum(r.correct for r in results) / len(results):.2f}"}
                if recorder is not None:
                    postfix["capture"] = _size(Path(recorder.writer.path))
                bar.set_postfix(postfix)
        elapsed = time.perf_counter() - started
        summary = _summary(cfg, results, elapsed, skipped=len(problems) - len(todo),
                           capture=recorder, total_problems=len(problems))
        if recorder is not None:
            recorder.finish(summary)
    finally:
        bar.close()
        if recorder is not None:
            recorder.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(cfg, results, elapsed, skipped, capture, total_problems) -> dict:
    correct = sum(r.correct for r in results)
    if capture is not None and skipped:
        # problems finished by an earlier, interrupted run of the same capture
        from capture.format import CaptureReader

        with CaptureReader(capture.writer.path) as reader:
            correct = sum(bool(reader.problem(n).correct) for n in reader.problem_numbers)
    total = len(results) + skipped
    summary = {
        "method": cfg.method,
        "model": cfg.model_name,
        "task": cfg.task,
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "total_time_sec": round(elapsed, 3),
        "time_per_sample_sec": round(elapsed / len(results), 3) if results else 0.0,
        "generated_tokens": sum(r.generated_tokens for r in results),
    }
    if skipped:
        summary["resumed_problems"] = skipped
    if capture is not None:
        summary["capture_file"] = str(capture.writer.path)
    return summary


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return "?"
