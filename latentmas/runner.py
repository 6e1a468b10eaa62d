"""Run a method over a task's problems: batches, progress bar, results JSONL, summary, capture.

Under torchrun (`torchrun --nproc_per_node K -m latentmas capture ...`) every rank runs
`run()`: each loads the model on its own GPU, solves a disjoint share of the problems
not done yet, and writes its own capture shard (`captures/<run>.h5.shards/rank-0000R.h5`)
and results part (`runs/<run>/results.shards/rank-0000R.jsonl`); at the end rank 0 merges
them into the run's one capture file and `results.jsonl` (both in problem-number order)
and writes the summary over all ranks. See `_run_sharded`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from capture.recorder import capture_identity

from .config import RunConfig
from .tasks import get_task, load_problems

RESULT_PARTS = "results.shards"  # per-rank results of a torchrun run, inside the run's output folder


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

    Launched by torchrun (WORLD_SIZE/RANK in the environment), or when the capture file has
    shards left by an interrupted torchrun run, the problems are shared out between the
    ranks and merged at the end (`_run_sharded`); the results do not depend on the number
    of ranks.

    Returns the run summary (also written to `<output_dir>/<run name>/summary.json`).
    """
    from capture.merge import shard_dir

    from . import distributed

    if capture_file is not None and cfg.method != "latent_mas":
        raise ValueError(f"capture needs --method latent_mas (method {cfg.method} shares no KV cache)")
    if distributed.launched() or (capture_file is not None and shard_dir(capture_file).is_dir()):
        group = distributed.join(cfg.device)
        try:
            summary = _run_sharded(group, cfg, capture_file, transitions, overwrite, output_dir, progress,
                                   capture_dtype)
            group.barrier()  # no rank tears its process group down while a peer still receives the summary
            return summary
        finally:
            group.close()
    return _run_single(cfg, capture_file, transitions, overwrite, output_dir, progress, capture_dtype)


def _run_single(cfg, capture_file, transitions, overwrite, output_dir, progress, capture_dtype) -> dict:
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
        recorder = CaptureRecorder.open(capture_file, cfg, lm, transitions, overwrite, capture_dtype,
                                        questions={p.number: p.question for p in problems})
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
        _keep_results(results_path, done)
        with open(results_path, "a", encoding="utf-8") as out:
            for start in range(0, len(todo), cfg.generate_bs):
                batch = todo[start:start + cfg.generate_bs]
                batch_results = solve(lm, batch, task, cfg, observer=recorder)
                for result in batch_results:
                    out.write(_jsonl(result))
                out.flush()
                if recorder is not None:
                    recorder.write_batch(batch_results)
                results.extend(batch_results)
                bar.update(len(batch))
                postfix = {"acc": f"{sum(r.correct for r in results) / len(results):.2f}"}
                if recorder is not None:
                    postfix["capture"] = _size(Path(recorder.writer.path))
                bar.set_postfix(postfix)
        elapsed = time.perf_counter() - started
        summary = _summary(cfg, results, elapsed, skipped=len(problems) - len(todo),
                           capture=recorder, numbers={p.number for p in problems})
        if recorder is not None:
            recorder.finish(summary)
    finally:
        bar.close()
        if recorder is not None:
            recorder.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------- several ranks


def _run_sharded(group, cfg, capture_file, transitions, overwrite, output_dir, progress, capture_dtype) -> dict:
    """One rank's part of a run shared by `group.world_size` processes (1 is fine: a rerun
    without torchrun that finds shards).

    1. Every rank loads the problems and the model (on `cuda:LOCAL_RANK`).
    2. Rank 0, while nobody writes: the problems done = those in the capture file or any
       shard (`capture.merge.completed_numbers`, which also refuses other settings); it
       tells every rank.
    3. Each rank solves `todo[rank::world_size]` (todo in problem order): disjoint,
       deterministic, balanced even on a resume; a problem's result never depends on
       which rank or batch solves it. It appends to its own shard and results part.
    4. All ranks meet; rank 0 merges shards and results parts in number order, writes
       the summary over all ranks, and every rank returns it.

    A failure while setting up or solving on any rank stops every rank (rank 0 reports it).
    """
    from capture import merge as shards
    from capture.recorder import CaptureRecorder

    from . import distributed
    from .methods import get_method
    from .models import load_model

    capture_file = Path(capture_file) if capture_file is not None else None
    run_dir = Path(output_dir) / cfg.run_name()
    parts = run_dir / RESULT_PARTS
    main = group.is_main

    def load():
        task = get_task(cfg.task)
        with group.quiet_if_not_main():
            problems = load_problems(task, cfg.data_file, cfg.max_samples, cfg.seed)
        device = distributed.rank_device(cfg.device, group.local_rank)
        lm = load_model(cfg.model_name, device, random_weights=cfg.random_weights, seed=cfg.seed)
        return task, problems, lm

    task, problems, lm = group.agree(load)
    solve = get_method(cfg.method)
    torch.manual_seed(cfg.seed)

    def plan() -> dict:  # rank 0 only, before any rank writes
        parts.mkdir(parents=True, exist_ok=True)
        done: set[int] = set()
        if capture_file is not None:
            if overwrite:
                shards.remove_shards(capture_file)
                capture_file.unlink(missing_ok=True)
            done = shards.completed_numbers(capture_file, capture_identity(cfg, transitions, capture_dtype),
                                            {p.number: p.question for p in problems})
        offsets = {}
        for part in sorted(parts.glob("rank-*.jsonl")):
            if done:  # resuming: keep the parts of the interrupted run, minus a torn last line
                offsets[part.name] = _trim_torn_line(part)
            else:
                part.unlink()
        return {"done": sorted(done), "offsets": offsets}

    planned = group.broadcast(group.agree(lambda: plan() if main else None))
    done = set(planned["done"])
    todo = [p for p in problems if p.number not in done]
    mine = todo[group.rank::group.world_size]

    def open_outputs():
        recorder = None
        if capture_file is not None:
            recorder = CaptureRecorder.open(shards.shard_path(capture_file, group.rank), cfg, lm, transitions,
                                            False, capture_dtype)
        return recorder, open(parts / f"rank-{group.rank:05d}.jsonl", "a", encoding="utf-8")

    recorder, out = group.agree(open_outputs)
    started = time.perf_counter()
    tracker = None
    if main and progress:
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"{cfg.method} {cfg.task}",
                   unit="problem", dynamic_ncols=True)
        tracker = _Progress(bar, [parts / f"rank-{r:05d}.jsonl" for r in range(group.world_size)],
                            planned["offsets"], capture_file)

    def solve_my_share() -> dict:
        results = []
        try:
            for start in range(0, len(mine), cfg.generate_bs):
                batch = mine[start:start + cfg.generate_bs]
                batch_results = solve(lm, batch, task, cfg, observer=recorder)
                out.write("".join(_jsonl(result) for result in batch_results))
                out.flush()  # results first, as in `_run_single`: a kill in between re-solves the batch
                if recorder is not None:
                    recorder.write_batch(batch_results)
                results.extend(batch_results)
                if tracker is not None:
                    tracker.poll()
                group.maybe_die(len(results))
        finally:
            out.close()
            if recorder is not None:
                recorder.close()
        return {"solved": len(results), "correct": sum(bool(r.correct) for r in results),
                "generated_tokens": sum(r.generated_tokens for r in results)}

    try:
        counts = group.gather(group.agree(solve_my_share))  # every rank has finished its share
    finally:
        if tracker is not None:
            tracker.close()

    def finish() -> dict | None:
        if not main:
            return None
        merge_started = time.perf_counter()
        summary = None

        def complete(correct: int, total: int) -> dict:
            nonlocal summary
            summary = run_summary(
                cfg, correct=correct, total=total, solved=sum(c["solved"] for c in counts),
                elapsed=time.perf_counter() - started, resumed=len(problems) - len(todo),
                generated_tokens=sum(c["generated_tokens"] for c in counts), capture_file=capture_file,
                world_size=group.world_size, merge_time_sec=round(time.perf_counter() - merge_started, 3))
            return summary

        lines = _merge_results(run_dir, parts, keep_existing=capture_file is not None and bool(done))
        if capture_file is not None:
            shards.merge(capture_file, summarize=lambda stats: complete(stats.correct, stats.total),
                         extra_attrs={"world_size": group.world_size})
        else:
            complete(sum(bool(json.loads(line)["correct"]) for line in lines), len(lines))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    return group.broadcast(group.agree(finish))


class _Progress:
    """Rank 0's bar over the whole run: it tails every rank's results part (one JSON line per
    finished problem), after each of its own batches and once a second from a thread, so
    no rank ever waits for it."""

    def __init__(self, bar, files: list[Path], offsets: dict[str, int], capture_file: Path | None):
        self.bar = bar
        self.files = files
        self.offsets = {f: offsets.get(f.name, 0) for f in files}
        self.capture_file = capture_file
        self.solved = self.correct = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latentmas-progress", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            new = 0
            for path in self.files:
                try:
                    with open(path, "rb") as f:
                        f.seek(self.offsets[path])
                        chunk = f.read()
                except OSError:
                    continue
                end = chunk.rfind(b"\n") + 1
                for line in chunk[:end].splitlines():
                    new += 1
                    try:
                        self.correct += bool(json.loads(line)["correct"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn or foreign line counts as not correct
                self.offsets[path] += end
            if not new:
                return
            self.solved += new
            self.bar.update(new)
            postfix = {"acc": f"{self.correct / self.solved:.2f}"}
            if self.capture_file is not None:
                from capture.merge import shard_files

                total = sum(p.stat().st_size for p in shard_files(self.capture_file) if p.exists())
                postfix["capture"] = _format_size(total)
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()


def _trim_torn_line(path: Path) -> int:
    """Cut a last line without its newline (a writer killed mid-line); return the new size."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return keep


def _merge_results(run_dir: Path, parts: Path, keep_existing: bool) -> list[str]:
    """Merge the results parts (and, when resuming, the existing results.jsonl) into
    results.jsonl, one line per problem number, sorted; delete the parts. Returns the lines."""
    by_number: dict[int, str] = {}
    files = ([run_dir / "results.jsonl"] if keep_existing else []) + sorted(parts.glob("rank-*.jsonl"))
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                number = int(json.loads(line)["number"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line
            by_number.setdefault(number, line)
    lines = [by_number[n] for n in sorted(by_number)]
    tmp = run_dir / "results.jsonl.merge-tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, run_dir / "results.jsonl")
    for part in parts.glob("rank-*.jsonl"):
        part.unlink()
    with contextlib.suppress(OSError):
        parts.rmdir()
    return lines


def _keep_results(path: Path, numbers: set[int]) -> None:
    """Rewrite `path` with only its (first) lines for `numbers`: what a resumed capture holds.

    A run killed between its results line and its capture commit (or the reverse) leaves
    the two out of step; the capture file decides, and the rest is solved again.
    """
    kept, seen = [], set()
    if numbers and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                number = json.loads(line)["number"]
            except (ValueError, KeyError, TypeError):
                continue
            if number in numbers and number not in seen:
                seen.add(number)
                kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")


def _jsonl(result) -> str:
    return json.dumps(dataclasses.asdict(result), ensure_ascii=False) + "\n"


def _summary(cfg, results, elapsed, skipped, capture, numbers: set[int]) -> dict:
    """The run summary over the problems of this run (`numbers`), finished now or earlier."""
    correct = sum(r.correct for r in results)
    if capture is not None and skipped:
        # problems finished by an earlier, interrupted run of the same capture
        from capture.format import CaptureReader

        fresh = {r.number for r in results}
        with CaptureReader(capture.writer.path) as reader:
            correct += sum(bool(reader.problem(n).correct) for n in reader.problem_numbers
                           if n in numbers and n not in fresh)
    return run_summary(cfg, correct=correct, total=len(results) + skipped, solved=len(results), elapsed=elapsed,
                       resumed=skipped, generated_tokens=sum(r.generated_tokens for r in results),
                       capture_file=None if capture is None else capture.writer.path)


def run_summary(cfg, *, correct: int, total: int, solved: int, elapsed: float, resumed: int, generated_tokens: int,
                capture_file=None, **extra) -> dict:
    """summary.json: accuracy over all `total` problems (the `solved` ones of this run and the `resumed`
    ones an earlier run finished), time per problem over the `solved` ones, then `extra`."""
    summary = {
        "method": cfg.method,
        "model": cfg.model_name,
        "task": cfg.task,
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "total_time_sec": round(elapsed, 3),
        "time_per_sample_sec": round(elapsed / solved, 3) if solved else 0.0,
        "generated_tokens": generated_tokens,
    }
    if resumed:
        summary["resumed_problems"] = resumed
    if capture_file is not None:
        summary["capture_file"] = str(capture_file)
    return summary | extra


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "?"
    return _format_size(size)


def _format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return "?"
