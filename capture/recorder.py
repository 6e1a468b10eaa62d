"""Capture: watch LatentMAS hand-offs and stream their similarity matrices into a capture file.

The matrices are computed on the device (no host sync): for the "seed" mode when a
hand-off happens; for "query" and "attention" during the incoming agent's prompt
prefill, which `watch_prefill` wraps in hooks (`capture.hooks.PrefillProbe`), one
`[batch, T]` row per layer as the layers run. Each hand-off's data then starts its
copy to the host without waiting. While the judger decodes (`while_decoding`, called
once the device has queued work) the batch's hand-offs are written to the file
(`CaptureWriter.stage`), so the compression and I/O overlap the device; when the
batch's results are known, `write_batch` commits them. Capture never draws.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shlex
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import torch

import latentmas
from latentmas.shared_cache import LATENT

from .format import LATENT_TOKEN, CaptureWriter, Handoff, ProblemRecord, Segment, handoff_name
from .hooks import PrefillProbe
from .similarity import PREFILL_MODES, check_mode, layer_similarities

DEFAULT_TRANSITIONS = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger")


@dataclass
class _Pending:
    """A hand-off seen during the current batch.

    similarities: [batch, num_layers, T], None until the incoming prefill has been
    watched (modes "query" and "attention"); the rest [batch, T], taken at the hand-off.
    `to_host()` starts their copy to the host (pinned memory, no wait, on CUDA);
    `host()` waits for it and returns numpy arrays.
    """

    from_agent: str
    to_agent: str
    similarities: torch.Tensor | None
    mask: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    segment_ids: torch.Tensor
    segments: list
    _copies: dict | None = None
    _copied: object = None  # a CUDA event recorded after the copies

    def to_host(self) -> None:
        tensors = {"similarities": self.similarities, "mask": self.mask, "positions": self.positions,
                   "token_ids": self.token_ids, "segment_ids": self.segment_ids}
        self._copies = {name: _host_copy(t) for name, t in tensors.items()}
        if self.mask.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def host(self) -> dict:
        if self._copied is not None:
            self._copied.synchronize()
        arrays = {name: t.numpy() for name, t in self._copies.items()}
        return dict(arrays, from_agent=self.from_agent, to_agent=self.to_agent, segments=self.segments)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the host: on CUDA an asynchronous copy into pinned memory (valid after an event sync)."""
    if tensor.device.type != "cuda":
        return tensor.detach()
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return copy.copy_(tensor, non_blocking=True)


def run_attributes(cfg, lm) -> dict:
    """Self-description stored with every capture."""
    device = lm.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    knn = cfg.knn_settings() or {}
    return {
        "package_version": latentmas.__version__,
        "command": shlex.join(sys.argv),
        "model_name": cfg.model_name,
        "random_weights": cfg.random_weights,
        "num_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "head_dim": lm.head_dim,
        "hidden_size": lm.hidden_size,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": device_name,
        "method": cfg.method,
        "task": cfg.task,
        "prompt": cfg.prompt,
        "latent_steps": cfg.latent_steps,
        "latent_space_realign": cfg.latent_space_realign,
        "knn_filter": cfg.knn_filter,
        "knn_percentage": knn.get("percentage", 0.0),
        "knn_min_keep": knn.get("min_keep", 0),
        "knn_strategy": knn.get("strategy", ""),
        "knn_score": cfg.knn_score if knn else "",
        "similarity": cfg.similarity,
        "seed": cfg.seed,
        "generate_bs": cfg.generate_bs,
        "started_at": now(),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def capture_identity(cfg, transitions: tuple[str, ...] | None, capture_dtype: str) -> dict:
    """The settings a capture file stores and a resume must match (as JSON types, like the file's copy)."""
    identity = dict(cfg.identity(), transitions="all" if transitions is None else list(transitions),
                    capture_dtype=capture_dtype)
    return json.loads(json.dumps(identity, sort_keys=True))


def parse_transitions(spec: str | None) -> tuple[str, ...] | None:
    """'planner_to_critic,critic_to_refiner' -> names; 'all' -> None (every hand-off); None -> the default three."""
    if spec is None or spec == "":
        return DEFAULT_TRANSITIONS
    if spec == "all":
        return None
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not names:
        raise ValueError(f"--transitions {spec!r} names no hand-off; give names or 'all'")
    from latentmas.prompts import AGENTS

    known = {handoff_name(a, b) for a, b in zip(AGENTS, AGENTS[1:])}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown transition {unknown[0]!r}; choose from {', '.join(sorted(known))} or all")
    return names


class CaptureRecorder:
    """A `PrefillObserver` (hand-offs, and prefills for "query"/"attention") that writes each finished
    batch to a `CaptureWriter`."""

    def __init__(self, writer: CaptureWriter, lm, similarity: str = "seed", transitions=DEFAULT_TRANSITIONS):
        self.writer = writer
        self.lm = lm
        self.similarity = check_mode(similarity)
        self.transitions = transitions
        self._pending: list[_Pending] = []
        self._awaiting: list[tuple[object, _Pending]] = []  # (event, entry) whose prefill is still to come
        self._token_text: dict[int, str] = {}
        self._batch_cache = None  # a weak reference to the shared cache of the batch being solved
        self._numbers: list[int] = []  # its problem numbers
        self._staged = None  # its StagedHandoffs once written (`while_decoding`), until `write_batch` commits them

    def _begin_batch(self, shared, numbers: list[int]) -> None:
        """Forget whatever a batch that never reached `write_batch` left (its staged rows get overwritten)."""
        self._batch_cache, self._numbers = weakref.ref(shared), numbers
        self._pending, self._awaiting, self._staged = [], [], None

    @classmethod
    def open(cls, path, cfg, lm, transitions=DEFAULT_TRANSITIONS, overwrite=False, dtype="float16", questions=None):
        """`CaptureWriter.open` with this run's settings; `questions` (number -> question) guard a resume."""
        identity = capture_identity(cfg, transitions, dtype)
        writer = CaptureWriter.open(path, run_attributes(cfg, lm), identity, lm.num_layers, dtype, overwrite,
                                    questions)
        return cls(writer, lm, cfg.similarity, transitions)

    @property
    def completed_numbers(self) -> set[int]:
        return self.writer.completed_numbers

    # -- HandoffObserver -------------------------------------------------------------
    def on_handoff(self, event) -> None:
        shared = event.shared
        if self._batch_cache is None or self._batch_cache() is not shared:  # a new batch: each solve has its own cache
            self._begin_batch(shared, [p.number for p in event.problems])
        name = handoff_name(event.from_agent, event.to_agent)
        if self.transitions is not None and name not in self.transitions:
            return
        similarities = None
        if self.similarity not in PREFILL_MODES:
            similarities = layer_similarities(shared.layer_keys(), event.query, self.similarity)
        pending = _Pending(event.from_agent, event.to_agent, similarities, shared.mask, shared.positions,
                           shared.token_ids, shared.segment_ids, list(shared.segments))
        self._pending.append(pending)
        if similarities is None:
            self._awaiting.append((event, pending))
        else:
            pending.to_host()

    @contextlib.contextmanager
    def watch_prefill(self, event):
        """Hooks around the incoming agent's prompt prefill ("query"/"attention" modes; a no-op otherwise).

        The probe's columns are the T of `on_handoff`'s snapshot: nothing changes the cache in between.
        """
        entry = next((p for e, p in self._awaiting if e is event), None)
        if entry is None:
            yield
            return
        self._awaiting = [(e, p) for e, p in self._awaiting if e is not event]
        probe = PrefillProbe(event.shared, event.prompt_mask, self.similarity)
        if probe.width != entry.mask.shape[1]:
            name = handoff_name(entry.from_agent, entry.to_agent)
            raise RuntimeError(f"{name}: the cache changed between the hand-off and the prefill")
        with probe:
            yield
        entry.similarities = probe.result()
        entry.to_host()

    # -- writing -----------------------------------------------------------------------
    def while_decoding(self) -> None:
        """Write the batch's hand-offs now, while the device works through the judger's queued decoding."""
        if self._staged is None and self._pending:
            self._stage()

    def _stage(self) -> None:
        unwatched = [p for p in self._pending if p.similarities is None]
        if unwatched:
            p = unwatched[0]
            raise RuntimeError(f"similarity {self.similarity!r} needs the incoming agent's prefill, but "
                               f"{handoff_name(p.from_agent, p.to_agent)}'s was never watched "
                               "(call watch_prefill(event) around it)")
        pending = [p.host() for p in self._pending]
        self._staged = self.writer.stage(
            [[self._handoff(p, row) for p in pending] for row in range(len(self._numbers))], self._numbers)
        self._pending, self._awaiting = [], []

    def write_batch(self, results) -> None:
        """Commit each problem of the batch just solved, with the hand-offs seen for it."""
        numbers = [r.number for r in results]
        if self._staged is None and not self._pending:
            self._numbers = numbers  # no hand-off was captured: the problems are written without any
        if self._staged is None:
            self._stage()
        staged, self._staged, self._batch_cache = self._staged, None, None
        if self._numbers != numbers:
            raise RuntimeError(f"write_batch got problems {numbers}, but the hand-offs seen were for {self._numbers}")
        self.writer.commit(staged, [
            ProblemRecord(number=r.number, question=r.question, gold=r.gold, prediction=r.prediction,
                          correct=r.correct) for r in results])

    def _handoff(self, p: dict, row: int) -> Handoff:
        real = p["mask"][row]
        segment_ids = p["segment_ids"][row][real]
        return Handoff(
            from_agent=p["from_agent"], to_agent=p["to_agent"],
            layer_similarities=p["similarities"][row][:, real],
            positions=p["positions"][row][real],
            tokens=[self._text(int(t)) for t in p["token_ids"][row][real]],
            segments=_segments(segment_ids, p["segments"]),
        )

    def _text(self, token_id: int) -> str:
        if token_id == LATENT:
            return LATENT_TOKEN
        if token_id not in self._token_text:
            self._token_text[token_id] = self.lm.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def finish(self, summary: dict) -> None:
        self.writer.finish(now(), summary)

    def close(self) -> None:
        self.writer.close()


def _segments(segment_ids: np.ndarray, keys) -> list[Segment]:
    """Run-length encode per-column segment ids `[T]` into Segment ranges."""
    if segment_ids.size == 0:
        return []
    starts = np.flatnonzero(np.diff(segment_ids)) + 1
    bounds = np.concatenate([[0], starts, [segment_ids.size]])
    return [Segment(keys[segment_ids[a]].agent, keys[segment_ids[a]].kind, int(a), int(b))
            for a, b in zip(bounds[:-1], bounds[1:])]
