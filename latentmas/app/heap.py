"""Python's garbage collector in a long run: what is alive after the first batch is kept out of it.

By the end of a run's first batch the process holds everything it keeps for the run: the model,
torch.compile's graphs and inductor's kernels, the CUDA graphs, the tokenizer. Those are millions of
objects the collector tracks, and a full collection walks all of them; capture's staging makes
enough new containers at large batch sizes to set one off now and then, in the middle of a batch
(stop 26, one H200, batch size 64: 3.0 s of one pass of 64 problems was the collector's).
`freeze_survivors` collects once and then moves every survivor into the permanent generation
(`gc.freeze`), so later collections walk only what later batches make. Nothing is freed early or
kept alive that was not: frozen objects still go when their reference count drops to zero; only a
reference cycle among them that becomes garbage meanwhile waits until the run ends, when
`survivors_frozen` puts them back (`gc.unfreeze`), so the collector and the interpreter's shutdown
see them as before (frozen at exit, triton's bindings report their objects as leaked). Where the process
had frozen objects of its own before the run, ours are frozen beside them and stay frozen after it:
`gc.unfreeze` cannot tell its objects from ours, and unfreezing them is not ours to do. (Every bench
process on an H100 lent in stop 29, torch 2.11, had objects frozen by the end of its warm-up passes;
with stop 28's rule, to freeze nothing then, the freeze never ran there.)
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator


def freeze_survivors() -> float:
    """One full collection, then every object still alive into the permanent generation; returns the
    seconds the full collection took."""
    started = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - started
    gc.freeze()
    return seconds


@contextlib.contextmanager
def survivors_frozen() -> Iterator[Callable[[], float]]:
    """Yields `freeze_survivors`, to call once the run is warm; on leaving, whatever it froze is back in
    the collector's oldest generation, unless objects were frozen before the block: then everything
    frozen stays so."""
    theirs = gc.get_freeze_count() > 0
    try:
        yield freeze_survivors
    finally:
        if not theirs:
            gc.unfreeze()
