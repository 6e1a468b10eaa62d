"""The hand-off contract: what the system tells an observer (capture) when one agent hands the
shared cache to the next. The system defines it and knows nothing of who listens.

An observer hears of each hand-off twice: `on_handoff(event)` when the cache is handed over
(after any kNN trim, before the incoming agent reads it), and, if it defines it,
`watch_prefill(event)`, a context manager wrapped around the incoming agent's prompt prefill
(for the judger, the prefill before decoding), so hooks can read that forward pass
(`latentmas.prefill.PrefillProbe`). `while_decoding()`, if defined, is called once while the
judger decodes; it may return an iterator of small pieces of work, taken one per decoding step.
`on_latent_steps(event)`, if defined (and the observer's `wants_latent_steps` is not False), is
called after each agent's latent steps with the hidden states they fed back (`LatentStepsEvent`);
the system keeps those states only for such an observer.

Cache columns carry token ids; latent steps carry `LATENT`, padding `PAD`.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from .shared_cache import SharedCache

LATENT = -1  # token id of a latent step's column
PAD = -2  # token id of a padding column


@dataclass
class HandoffEvent:
    """The moment `to_agent` takes over the shared cache from `from_agent`.

    query: [batch, hidden], mean input embedding of `to_agent`'s prompt (real tokens only).
    prompt_ids / prompt_mask: [batch, n], `to_agent`'s left-padded prompt.
    """

    from_agent: str
    to_agent: str
    shared: SharedCache
    query: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    problems: list


@dataclass
class LatentStepsEvent:
    """`agent` has just taken its latent steps: the last `steps` columns of `shared` are its latent columns.

    hidden_states: [batch, steps, hidden], the final hidden state (after the final norm) that became
        each latent column's input, before realignment: column i's input came from hidden_states[:, i]
        (the first one is the prompt's last hidden state).
    realigned: [batch, steps, hidden], the input embeddings actually fed (hidden states after
        `--latent_space_realign`'s mapping), or None when no realignment was applied.
    """

    agent: str
    shared: SharedCache
    hidden_states: torch.Tensor
    realigned: torch.Tensor | None
    problems: list

    @property
    def steps(self) -> int:
        return int(self.hidden_states.shape[1])


class HandoffObserver(Protocol):
    """Told of every hand-off, after any kNN trim and before `to_agent` prefills its prompt.

    An observer may also define `watch_prefill(event) -> AbstractContextManager` (see
    `PrefillObserver`) and `while_decoding()`, called once while the judger decodes, after
    its prefill, when the device has work queued (host work there overlaps it); if it returns
    an iterator, the decoding loop takes its items (pieces of work) between the steps it queues
    (on CUDA while the device has steps enough queued, `decoding._Pacer`; on the CPU one a step), so
    a long piece of host work does not leave the device idle. Both are optional, and
    observers without them work as before.
    """

    def on_handoff(self, event: HandoffEvent) -> None: ...


class PrefillObserver(HandoffObserver, Protocol):
    """A `HandoffObserver` that also reads the incoming agent's prompt prefill.

    `watch_prefill(event)` is called right after `on_handoff(event)`, with the same event;
    the context manager it returns is entered around exactly one forward pass: `to_agent`'s
    prompt prefill on `event.shared` (the judger's included, inside `decode_turn`). When it
    exits, the prefill has run and the prompt's columns follow the hand-off's T columns in
    the cache. Nothing else (latent steps, decoding) runs inside it.
    """

    def watch_prefill(self, event: HandoffEvent) -> AbstractContextManager: ...


def watch_prefill(observer, event: HandoffEvent | None) -> AbstractContextManager:
    """The observer's `watch_prefill(event)`, or a no-op when there is no event or no such method."""
    watch = getattr(observer, "watch_prefill", None)
    if event is None or watch is None:
        return contextlib.nullcontext()
    return watch(event)


def latent_steps_hook(observer):
    """The observer's `on_latent_steps`, or None when it has none or its `wants_latent_steps` is False."""
    hook = getattr(observer, "on_latent_steps", None)
    if hook is None or not getattr(observer, "wants_latent_steps", True):
        return None
    return hook
