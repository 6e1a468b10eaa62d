"""Several processes, one run: torch.distributed as launched by `torchrun` (or `srun torchrun`,
`accelerate launch`), detected from the environment it sets (WORLD_SIZE, RANK, LOCAL_RANK).

The ranks only exchange small control messages (the problems already done, errors,
per-rank counts) as Python objects; the process group is `cpu:gloo,cuda:nccl` when the
model runs on CUDA (object collectives then go through gloo on the CPU, so no GPU work
waits on them) and plain `gloo` on the CPU. Each rank loads the model on its own GPU
(`cuda:LOCAL_RANK`) and solves a disjoint share of the problems; see `latentmas.app.run`.

A `Group` with world size 1 needs no process group at all: every collective is local.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from capture.text import one_line

T = TypeVar("T")

# Ranks wait for each other at the start (after loading the model) and at the end (while
# rank 0 merges). A rank that dies is noticed by torchrun, which stops the others, so a
# long timeout costs nothing in that case; it only bounds a hang.
TIMEOUT = dt.timedelta(hours=6)

# Test-only hook (tests/test_distributed.py): "RANK:N" makes that rank SIGKILL itself right
# after committing the batch that holds its N-th problem of the run, like a lost node.
DIE_AFTER_ENV = "LATENTMAS_TEST_DIE_AFTER"


# Intra-op threads of every process of a CPU run (default 1). Float reductions (matmuls, norms)
# depend on the thread count; with the same count in every process, a run's matrices are the same
# bit for bit whatever the world size (torchrun would give ranks 1 thread, a lone process all cores).
CPU_THREADS_ENV = "LATENTMAS_CPU_THREADS"


def cpu_threads() -> int:
    """The intra-op thread count of a CPU run: LATENTMAS_CPU_THREADS, default 1 (ValueError when not a count)."""
    text = os.environ.get(CPU_THREADS_ENV, "").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{CPU_THREADS_ENV}={text!r} is not a thread count (a whole number >= 1)")
    return int(text)


@contextlib.contextmanager
def same_threads_on_cpu(device: str):
    """While a run on the CPU goes: torch computes with `cpu_threads()` intra-op threads (restored after).
    `device` is this rank's device (`rank_device`); a CUDA run is left as it is."""
    import torch

    if not device.startswith("cpu"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or any process that was not launched by torchrun."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def rank_device(device: str, local_rank: int) -> str:
    """The device this rank's model goes on: `auto`/`cuda` -> `cuda:LOCAL_RANK` (when CUDA exists);
    `cpu` and an explicit `cuda:N` stay as given."""
    import torch

    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


class PeerFailed(SystemExit):
    """Raised on ranks other than 0 when a step failed somewhere: rank 0 reports the error,
    the others leave quietly with exit status 1."""

    def __init__(self):
        super().__init__(1)


@dataclass
class Group:
    """This process's place in the run, and the few collectives the runner needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (objects, via the CPU) --------------------------------------------
    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank (also a barrier)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; if it fails on any rank, fail everywhere.

        Rank 0 raises the error (its own, or a peer's with "rank N:" in front); the other
        ranks raise `PeerFailed` (exit status 1, nothing printed). Without this, a rank
        that fails alone would leave the others waiting at the next collective.
        """
        try:
            value, error = step(), None
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            value, error = None, exc
        if not self.distributed:
            if error is not None:
                raise error
            return value
        reports = self.gather(None if error is None else (type(error).__name__, one_line(error)))
        if not any(reports):
            return value
        if not self.is_main:
            raise PeerFailed()
        if error is not None:
            raise error
        rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep)
        raise _rebuild(kind, f"rank {rank}: {message}")

    # -- life cycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Destroy the process group if this Group created it."""
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_process_group = False

    def quiet_if_not_main(self) -> contextlib.AbstractContextManager:
        """Swallow stderr notices (e.g. 'hub unavailable') on ranks other than 0."""
        return contextlib.nullcontext() if self.is_main else contextlib.redirect_stderr(io.StringIO())

    def maybe_die(self, committed: int) -> None:
        """The test-only `LATENTMAS_TEST_DIE_AFTER=RANK:N` hook (see DIE_AFTER_ENV)."""
        spec = os.environ.get(DIE_AFTER_ENV)
        if spec:
            rank, count = (int(x) for x in spec.split(":"))
            if rank == self.rank and committed >= count:
                os.kill(os.getpid(), signal.SIGKILL)


def join(device: str) -> Group:
    """This process's `Group`: joins the torchrun process group (initialising it once) when
    launched by torchrun, else a one-process group. `device` is the run's --device."""
    if not launched():
        return Group()
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if rank != 0:
        _silence()
    owns = False
    if world > 1 and not dist.is_initialized():
        name = rank_device(device, local_rank)
        on_cuda = name.startswith("cuda")
        if on_cuda and torch.cuda.is_available():
            index = int(name.partition(":")[2] or 0) if name.partition(":")[2].isdigit() or name == "cuda" else -1
            if 0 <= index < torch.cuda.device_count():
                torch.cuda.set_device(index)  # else load_model says what is wrong with the device
        backend = "cpu:gloo,cuda:nccl" if on_cuda and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        owns = True
    if dist.is_initialized():  # e.g. started by accelerate: use its numbering
        rank, world = dist.get_rank(), dist.get_world_size()
    return Group(rank=rank, world_size=world, local_rank=local_rank, owns_process_group=owns)


def _silence() -> None:
    """Ranks other than 0 print nothing but errors."""
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()



def _rebuild(kind: str, message: str) -> Exception:
    """A peer's error as an exception the CLI turns into one line (known kinds), else RuntimeError."""
    from capture.format import CaptureConfigMismatch, CaptureError

    from ..models import ModelLoadError
    from ..tasks import TaskDataError

    known = {cls.__name__: cls for cls in (CaptureConfigMismatch, CaptureError, ModelLoadError, TaskDataError,
                                            ValueError)}
    return known.get(kind, RuntimeError)(message)
