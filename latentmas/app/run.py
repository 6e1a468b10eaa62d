"""One run path: solve a task's problems with a method, from one process to many.

A run is always a group of ranks (`distributed.join`): one process is rank 0 of 1; under
torchrun (`torchrun --nproc_per_node K -m latentmas capture ...`) each process is one rank
that loads the model on its own GPU. Every run goes the same way:

1. Every rank loads the problems and the model.
2. Rank 0, while nobody writes (`_plan`): the problems already done are those committed in
   the capture file or any shard an interrupted multi-rank run left (`capture.merge`, which
   also refuses other settings or changed problems); an earlier run's results parts are kept
   when resuming. Runs without a capture file resume nothing.
3. Each rank solves its share of the problems still to do (`shares.balanced_shares`: counts equal
   give or take one, estimated work balanced, each share in problem order; `--batch_order length`:
   longest question first, `shares.in_batch_order`) in batches, appending each
   batch to its own results part and committing it to its capture target: the capture file
   itself for a one-rank run, else its own shard (`captures/<run>.h5.shards/rank-0000R.h5`).
   A problem's result never depends on which rank or batch solves it (on the CPU every process
   computes with the same thread count, `distributed.cpu_threads`). After the first batch,
   everything alive is kept out of Python's garbage collector until the share is done (`heap.py`).
4. Rank 0 merges the results parts into results.jsonl (`results.py`), the shards (if any)
   into the capture file (`capture.merge`), and writes the summary (`summary.py`), which
   every rank returns.

A failure while setting up or solving on any rank stops every rank (rank 0 reports it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from capture.format import sync_folder
from capture.selection import DEFAULT_TRANSITIONS

from ..config import RunConfig
from ..tasks.loading import problem_origin
from . import distributed, heap, results, shares
from .folders import writable_folder
from .recording import capture_identity, open_recorder
from .summary import read_summary, run_summary


def default_capture_file(cfg: RunConfig) -> Path:
    return Path("captures") / f"{cfg.run_name()}.h5"


def run(
    cfg: RunConfig,
    capture_file: str | os.PathLike | None = None,
    transitions: tuple[str, ...] | None = DEFAULT_TRANSITIONS,
    overwrite: bool = False,
    output_dir: str | os.PathLike = "runs",
    progress: bool = True,
    capture_dtype: str = "float16",
) -> dict:
    """Solve the task's problems with `cfg.method`; capture hand-offs when `capture_file` is set.

    transitions: the hand-offs to capture, by name; None captures every hand-off.
    Returns the run summary (also written to `<output_dir>/<run name>/summary.json`).
    """
    if capture_file is not None and cfg.method != "latent_mas":
        raise ValueError(f"capture needs --method latent_mas (method {cfg.method} shares no KV cache)")
    distributed.cpu_threads()  # a bad LATENTMAS_CPU_THREADS is refused before anything starts
    group = distributed.join(cfg.device)
    try:
        with distributed.same_threads_on_cpu(distributed.rank_device(cfg.device, group.local_rank)):
            summary = _Run(group, cfg, capture_file, transitions, overwrite, Path(output_dir), progress,
                           capture_dtype).go()
        group.barrier()  # no rank tears its process group down while a peer still receives the summary
        return summary
    finally:
        group.close()


class _Run:
    """One rank's part of a run (see the module docstring)."""

    def __init__(self, group, cfg, capture_file, transitions, overwrite, output_dir, progress, capture_dtype):
        self.group, self.cfg = group, cfg
        self.capture_file = Path(capture_file) if capture_file is not None else None
        self.transitions, self.overwrite, self.capture_dtype = transitions, overwrite, capture_dtype
        self.run_dir = output_dir / cfg.run_name()
        self.progress = progress

    def go(self) -> dict:
        group = self.group
        results_lock = group.agree(lambda: self._claim_outputs() if group.is_main else None)
        try:
            task, problems, lm = group.agree(self._load)
            self.origin = problem_origin(problems)
            return self._solve(task, problems, lm)
        finally:
            if results_lock is not None:
                results_lock.release()

    def _solve(self, task, problems, lm) -> dict:
        import torch

        from ..methods import get_method

        group, cfg = self.group, self.cfg
        solve = get_method(cfg.method)
        torch.manual_seed(cfg.seed)
        planned = group.broadcast(group.agree(lambda: self._plan(problems) if group.is_main else None))
        done = set(planned["done"])
        todo = [p for p in problems if p.number not in done]
        by_number = {p.number: p for p in todo}
        my_batches = shares.batches([by_number[n] for n in planned["shares"][group.rank]], cfg.generate_bs,
                                    cfg.batch_order)
        self.resumed_correct = planned["done"]
        recorder, out = group.agree(lambda: self._open_outputs(lm))
        started = time.perf_counter()
        tracker = self._tracker(len(problems), len(problems) - len(todo), planned["offsets"])

        def solve_my_share() -> dict:
            solved, last_commit = 0, time.time()
            try:
                with heap.survivors_frozen() as freeze:
                    for batch in my_batches:
                        batch_results = solve(lm, batch, task, cfg, observer=recorder)
                        out.write("".join(results.jsonl(r) for r in batch_results))
                        out.flush()  # results first: a kill before the capture commit re-solves the batch
                        os.fsync(out.fileno())  # and on the disk before the commit, so a power loss cannot lose it
                        if recorder is not None:
                            recorder.write_batch(batch_results)
                        if solved == 0:  # compiles and graphs are made: later collections skip them
                            freeze()
                        solved += len(batch_results)
                        last_commit = time.time()
                        if tracker is not None:
                            tracker.poll()
                        group.maybe_die(solved)
            finally:
                out.close()
                if recorder is not None and not self._writes_capture_file:
                    recorder.close()
            return {"solved": solved, "last_commit": last_commit}

        def finish() -> dict | None:
            return self._finish(recorder, problems, done, counts, started) if group.is_main else None

        try:
            try:
                counts = group.gather(group.agree(solve_my_share))  # every rank has finished its share
            finally:
                if tracker is not None:
                    tracker.close()
            return group.broadcast(group.agree(finish))
        finally:
            if recorder is not None and self._writes_capture_file:
                recorder.close()

    # -- steps ----------------------------------------------------------------------------
    def _claim_outputs(self):
        """Rank 0, before the model loads: the output folders can be written (else one line), and the
        run folder's results are this run's alone until it ends (a second run of the same command,
        started while this one lives, is refused before it touches them). Returns the results lock."""
        from capture.lock import CaptureLockedError, WriterLock

        if self.capture_file is not None:
            writable_folder(self.capture_file.parent, "the folder of --capture_file")
        writable_folder(self.run_dir, "--output_dir")
        try:
            return WriterLock.acquire(self.run_dir / results.RESULTS, hint="or pass another --output_dir")
        except CaptureLockedError as error:
            raise ValueError(str(error)) from None

    def _load(self):
        from ..models import load_model
        from ..tasks import get_task, load_problems

        cfg, group = self.cfg, self.group
        task = get_task(cfg.task)
        with group.quiet_if_not_main():
            problems = load_problems(task, cfg.data_file, cfg.max_samples, cfg.seed)
        device = distributed.rank_device(cfg.device, group.local_rank)
        lm = load_model(cfg.model_name, device, random_weights=cfg.random_weights, seed=cfg.seed,
                        fuse_projections=cfg.fast_decode)  # goes with the fast path (None: on CUDA)
        return task, problems, lm

    @property
    def _writes_capture_file(self) -> bool:
        """A one-rank run commits straight into the capture file; several ranks each into a shard."""
        return self.capture_file is not None and self.group.world_size == 1

    def _plan(self, problems) -> dict:
        """Rank 0, before any rank writes: the problems done (number -> correct, from the capture), and
        where the kept results parts end."""
        from capture import merge as shards

        done: dict[int, bool | None] = {}
        if self.capture_file is not None:
            if self.overwrite:
                shards.remove_shards(self.capture_file)
                self.capture_file.unlink(missing_ok=True)
            identity = capture_identity(self.cfg, self.transitions, self.capture_dtype)
            done = shards.completed_problems(self.capture_file, identity, {p.number: p.question for p in problems})
        offsets = results.prepare_parts(self.run_dir, resuming=bool(done))
        todo = {p.number: p.question for p in problems if p.number not in done}
        return {"done": done, "offsets": offsets,
                "shares": shares.balanced_shares(shares.question_work(todo), self.group.world_size)}

    def _open_outputs(self, lm):
        from capture import merge as shards

        recorder = None
        if self.capture_file is not None:
            target = self.capture_file if self._writes_capture_file else shards.shard_path(self.capture_file,
                                                                                           self.group.rank)
            recorder = open_recorder(target, self.cfg, lm, self.transitions, self.capture_dtype, origin=self.origin)
        part = results.part_path(self.run_dir, self.group.rank)
        out = open(part, "a", encoding="utf-8")
        for folder in (part.parent, self.run_dir):  # the new part's entry, so its fsynced lines can be found
            sync_folder(folder)
        return recorder, out

    def _tracker(self, total: int, initial: int, offsets: dict):
        if not (self.group.is_main and self.progress):
            return None
        from tqdm.auto import tqdm

        from .progress import Progress

        bar = tqdm(total=total, initial=initial, desc=f"{self.cfg.method} {self.cfg.task}", unit="problem",
                   dynamic_ncols=True)
        parts = [results.part_path(self.run_dir, r) for r in range(self.group.world_size)]
        return Progress(bar, parts, offsets, self.capture_file)

    def _finish(self, recorder, problems, done: set[int], counts: list[dict], started: float) -> dict:
        """Rank 0: results.jsonl, the capture file, summary.json."""
        from capture import merge as shards

        numbers = {p.number for p in problems}
        records = [r for r in results.merge_results(self.run_dir, keep=done) if r["number"] in numbers]
        # a resumed problem whose results line was lost still counts, as the capture holds it
        listed = {r["number"] for r in records}
        records += [{"number": n, "correct": self.resumed_correct[n]} for n in sorted(done & numbers - listed)]
        solved = sum(c["solved"] for c in counts)
        summary_path = self.run_dir / "summary.json"
        extra = {**self.origin, "world_size": self.group.world_size}
        if self.group.distributed:  # how long each rank waited, after its last commit, for the last rank's
            last = max(c["last_commit"] for c in counts)
            extra["rank_idle_sec"] = [round(last - c["last_commit"], 3) for c in counts]
        merging = self.capture_file is not None and bool(shards.shard_files(self.capture_file))
        merge_started = time.perf_counter()

        def summarize() -> dict:
            if merging:
                extra["merge_time_sec"] = round(time.perf_counter() - merge_started, 3)
            return run_summary(self.cfg, records, solved=solved, elapsed=time.perf_counter() - started,
                               resumed=len(done & numbers), capture_file=self.capture_file,
                               previous=read_summary(summary_path), **extra)

        if merging:
            if recorder is not None:
                recorder.close()
            summary = None

            def keep(_stats) -> dict:  # merge stores the summary in the merged file
                nonlocal summary
                summary = summarize()
                return summary

            shards.merge(self.capture_file, summarize=keep, extra_attrs={"world_size": self.group.world_size})
        else:
            summary = summarize()
            if recorder is not None:
                recorder.finish(summary)
        results.write_atomically(summary_path, json.dumps(summary, indent=2) + "\n")
        return summary
