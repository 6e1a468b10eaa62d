"""Running a function over chunks of problems in worker processes, results merged in chunk order.

Each worker opens the capture itself (only file names and problem numbers cross process
boundaries, and the accumulators come back pickled). On Linux the workers are forked, so they
start without re-importing numpy, h5py and pandas; the caller holds no HDF5 file open while the
pool starts. Results are merged in chunk order, so they do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor


def workers_for(jobs: int, num_chunks: int) -> int:
    """jobs 0 = one per core; never more workers than chunks."""
    wanted = jobs if jobs > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, num_chunks))


def run_chunks(work: Callable, chunks: Sequence, args: tuple, jobs: int, progress: bool, label: str, unit_count):
    """[work(chunk, *args) for chunk in chunks], in order, over `jobs` processes, with a tqdm bar counting
    `unit_count(chunk)` units per finished chunk."""
    from tqdm import tqdm

    workers = workers_for(jobs, len(chunks))
    total = sum(unit_count(c) for c in chunks)

    def bar():
        return tqdm(total=total, desc=label, unit="problem", file=sys.stderr, disable=not progress, leave=False,
                    dynamic_ncols=True)

    if workers == 1:
        results = []
        with bar() as shown:
            for chunk in chunks:
                results.append(work(chunk, *args))
                shown.update(unit_count(chunk))
        return results
    method = "fork" if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # the pool (and its forks) before the bar, whose monitor thread should not be running at a fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        futures = [pool.submit(work, chunk, *args) for chunk in chunks]
        results = []
        try:
            with bar() as shown:
                for chunk, future in zip(chunks, futures):
                    results.append(future.result())
                    shown.update(unit_count(chunk))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results
