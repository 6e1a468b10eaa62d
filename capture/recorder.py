"""Capture: watch LatentMAS hand-offs and stream their similarity matrices into a capture file.

The matrices are computed on the device (no host sync): for the "seed" mode when a
hand-off happens; for "query" and "attention" during the incoming agent's prompt
prefill, which `watch_prefill` wraps in hooks (`latentmas.prefill.PrefillProbe`), one
`[batch, T]` row per layer as the layers run. Each hand-off's data then starts its
copy to the host without waiting. While the judger decodes (`while_decoding`, called
once the device has queued work) the batch's hand-offs are written to the file
(`CaptureWriter.stage`) in pieces, one per decoding step (a problem's hand-offs, then the
write), so the compression and I/O overlap the device without ever leaving it idle; when the
batch's results are known, `write_batch` commits them. Capture never draws.

With a readout (`readout_top_k` > 0), after each agent's latent steps (`on_latent_steps`)
the LM head, softmax and top-k run on the device over the hidden states those steps fed
back (`capture.readout`), and the small result starts its one copy to the host; each
hand-off's latent columns then carry their step's readout (`LatentReadout`).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from latentmas.handoff import LATENT
from latentmas.prefill import PrefillProbe
from latentmas.similarity import get_mode

from .format import (
    LATENT_TOKEN,
    CaptureWriter,
    Handoff,
    LatentReadout,
    ProblemRecord,
    Segment,
    handoff_name,
    storable_text,
)
from .readout import latent_readout, unpack
from .selection import DEFAULT_TRANSITIONS


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


@dataclass
class _PendingReadout:
    """One agent's latent readout during the current batch: `latent_readout`'s [batch, steps, 2k + 3] with each
    step's cache position appended ([batch, steps, 2k + 4], float64), copying to the host (as `_Pending`)."""

    packed: torch.Tensor
    _copy: torch.Tensor | None = None
    _copied: object = None

    def to_host(self) -> None:
        self._copy = _host_copy(self.packed)
        if self.packed.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def host(self) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()
        return self._copy.numpy()


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the host: on CUDA an asynchronous copy into pinned memory (valid after an event sync)."""
    if tensor.device.type != "cuda":
        return tensor.detach()
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return copy.copy_(tensor, non_blocking=True)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class CaptureRecorder:
    """A `PrefillObserver` (hand-offs, and prefills for "query"/"attention") that writes each finished
    batch to a `CaptureWriter`."""

    def __init__(self, writer: CaptureWriter, lm, similarity: str = "seed", transitions=DEFAULT_TRANSITIONS):
        """The readout's k is the writer's (`CaptureWriter.readout_top_k`: a resumed file keeps its own)."""
        self.writer = writer
        self._readouts: dict[str, _PendingReadout] = {}  # agent -> its latent readout in the current batch
        self._host_readouts: dict[str, np.ndarray] = {}  # the same on the host, once staged
        self._embedding_norms = None  # [vocab] fp32, for the realign cosine
        self.lm = lm
        self.mode = get_mode(similarity)
        self.similarity = self.mode.name
        self.readout_top_k = writer.readout_top_k
        self.transitions = transitions
        self._pending: list[_Pending] = []
        self._awaiting: list[tuple[object, _Pending]] = []  # (event, entry) whose prefill is still to come
        self._token_text: dict[int, str] = {}
        self._batch_cache = None  # a weak reference to the shared cache of the batch being solved
        self._numbers: list[int] = []  # its problem numbers
        self._staged = None  # its StagedHandoffs once written (`while_decoding`), until `write_batch` commits them
        self._staging = None  # the pieces of that writing still to do, once `while_decoding` began it

    def _begin_batch(self, shared, numbers: list[int]) -> None:
        """Forget whatever a batch that never reached `write_batch` left (its staged rows get overwritten)."""
        self._batch_cache, self._numbers, self._staging = weakref.ref(shared), numbers, None
        self._pending, self._awaiting, self._staged = [], [], None
        self._readouts = {}

    @classmethod
    def open(cls, path, lm, *, run_attributes: dict, identity: dict, similarity: str = "seed",
             transitions=DEFAULT_TRANSITIONS, overwrite=False, dtype="float16", questions=None, readout_top_k=0):
        """`CaptureWriter.open` for a run.

        run_attributes: the run's self-description (stored as the file's attributes, with the
            similarity mode's own: its value range and colour scale, see `SimilarityMode`).
        identity: the settings a resume must match. questions (number -> question) guard a resume.
        readout_top_k: tokens kept per latent step's readout (0: no readout).
        """
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        if not 0 <= readout_top_k <= vocab:
            raise ValueError(f"readout_top_k must be between 0 and the vocabulary size {vocab}, not {readout_top_k}")
        attributes = dict(run_attributes, **get_mode(similarity).file_attributes(), started_at=now())
        writer = CaptureWriter.open(path, attributes, identity, lm.num_layers, dtype, overwrite, questions,
                                    readout_top_k=readout_top_k)
        return cls(writer, lm, similarity, transitions)

    @property
    def completed_numbers(self) -> set[int]:
        return self.writer.completed_numbers

    def _note_batch(self, event) -> None:
        shared = event.shared
        if self._batch_cache is None or self._batch_cache() is not shared:  # a new batch: each solve has its own cache
            self._begin_batch(shared, [p.number for p in event.problems])

    # -- latent steps ----------------------------------------------------------------
    @property
    def wants_latent_steps(self) -> bool:
        return self.readout_top_k > 0

    def on_latent_steps(self, event) -> None:
        """Start the readout of `event.agent`'s latent steps (`latentmas.handoff.LatentStepsEvent`) on the device."""
        self._note_batch(event)
        if event.realigned is not None and self._embedding_norms is None:
            self._embedding_norms = self.lm.model.get_input_embeddings().weight.detach().float().norm(dim=1)
        packed = latent_readout(self.lm, event.hidden_states, event.realigned, self.readout_top_k,
                                self._embedding_norms)
        positions = event.shared.positions[:, -event.steps:]  # [batch, steps]: the latent columns just added
        pending = _PendingReadout(torch.cat([packed, positions.double()[..., None]], dim=-1))
        pending.to_host()
        self._readouts[event.agent] = pending

    # -- HandoffObserver -------------------------------------------------------------
    def on_handoff(self, event) -> None:
        shared = event.shared
        self._note_batch(event)
        name = handoff_name(event.from_agent, event.to_agent)
        if self.transitions is not None and name not in self.transitions:
            return
        similarities = None
        if not self.mode.needs_prefill:
            similarities = self.mode.score(shared.layer_keys(), event.query)
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
        probe = PrefillProbe(event.shared, event.prompt_mask, self.mode)
        if probe.width != entry.mask.shape[1]:
            name = handoff_name(entry.from_agent, entry.to_agent)
            raise RuntimeError(f"{name}: the cache changed between the hand-off and the prefill")
        with probe:
            yield
        entry.similarities = probe.result()
        entry.to_host()

    # -- writing -----------------------------------------------------------------------
    def while_decoding(self):
        """Write the batch's hand-offs while the device works through the judger's queued decoding: returns
        the work in pieces (an iterator, which `latentmas.decoding.generate` takes between its steps), or None."""
        if self._staged is None and self._pending and self._staging is None:
            self._staging = self._stage_in_pieces()
            return self._staging
        return None

    def _stage(self) -> None:
        """Stage the batch's hand-offs now (finishing what `while_decoding` began, if anything)."""
        collections.deque(self._staging or self._stage_in_pieces(), maxlen=0)  # every piece, in order

    def _stage_in_pieces(self) -> Iterator[None]:
        """Copies to the host, then each problem's hand-offs, then the write: a piece between yields.
        A failure forgets the pieces, so a later `write_batch` stages again (and fails again in one line)."""
        try:
            yield from self._staging_pieces()
        except BaseException:
            self._staging = None
            raise

    def _staging_pieces(self) -> Iterator[None]:
        unwatched = [p for p in self._pending if p.similarities is None]
        if unwatched:
            p = unwatched[0]
            raise RuntimeError(f"similarity {self.similarity!r} needs the incoming agent's prefill, but "
                               f"{handoff_name(p.from_agent, p.to_agent)}'s was never watched "
                               "(call watch_prefill(event) around it)")
        pending = [p.host() for p in self._pending]
        self._host_readouts = {agent: r.host() for agent, r in self._readouts.items()}
        yield
        per_problem = []
        for row in range(len(self._numbers)):
            per_problem.append([self._handoff(p, row) for p in pending])
            yield
        self._staged = yield from self.writer.stage_in_pieces(per_problem, self._numbers)
        self._pending, self._awaiting, self._readouts, self._staging = [], [], {}, None

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
            ProblemRecord(number=r.number, question=r.question, gold=r.gold, prediction=_storable(r.prediction),
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
            readout=self._readout(p, row) if self.readout_top_k else None,
        )

    def _readout(self, p: dict, row: int) -> LatentReadout:
        """The readout of each real column of hand-off `p` in batch row `row`: its agent's latent step at
        the column's cache position (positions within one agent's latent segment are distinct)."""
        real = p["mask"][row]
        token_ids, positions = p["token_ids"][row][real], p["positions"][row][real]
        segment_ids = p["segment_ids"][row][real]
        k = self.readout_top_k
        readout = LatentReadout.empty(len(token_ids), k)
        latent = token_ids == LATENT
        for index, segment in enumerate(p["segments"]):
            packed = self._host_readouts.get(segment.agent)
            columns = np.flatnonzero(latent & (segment_ids == index))
            if packed is None or not columns.size:
                continue
            step_positions = packed[row, :, -1]  # [steps]: each step's cache position
            order = np.argsort(step_positions)
            found = np.minimum(np.searchsorted(step_positions[order], positions[columns]), len(order) - 1)
            match = step_positions[order][found] == positions[columns]
            columns, steps = columns[match], order[found[match]]
            values = unpack(packed[row, steps, :-1], k)  # [columns, ...]
            readout.step[columns] = steps
            readout.ids[columns] = values["ids"]
            readout.probs[columns] = values["probs"]
            readout.entropy[columns] = values["entropy"]
            readout.realign_cosine[columns] = values["cosine"]
            for column, ids, nearest in zip(columns, values["ids"], values["nearest"]):
                readout.tokens[column] = [self._text(int(t)) for t in ids]
                if nearest >= 0:
                    readout.realign_token[column] = self._text(int(nearest))
        return readout

    def _text(self, token_id: int) -> str:
        if token_id == LATENT:
            return LATENT_TOKEN
        if token_id not in self._token_text:
            self._token_text[token_id] = storable_text(self.lm.tokenizer.decode([token_id]))
        return self._token_text[token_id]

    def finish(self, summary: dict) -> None:
        self.writer.finish(now(), summary)

    def close(self) -> None:
        self.writer.close()


def _storable(prediction: str | None) -> str | None:
    """The model's answer as a capture can store it (`storable_text`)."""
    return None if prediction is None else storable_text(prediction)


def _segments(segment_ids: np.ndarray, keys) -> list[Segment]:
    """Run-length encode per-column segment ids `[T]` into Segment ranges."""
    if segment_ids.size == 0:
        return []
    starts = np.flatnonzero(np.diff(segment_ids)) + 1
    bounds = np.concatenate([[0], starts, [segment_ids.size]])
    return [Segment(keys[segment_ids[a]].agent, keys[segment_ids[a]].kind, int(a), int(b))
            for a, b in zip(bounds[:-1], bounds[1:])]
