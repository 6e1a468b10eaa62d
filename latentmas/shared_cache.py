"""The KV cache that agents share, with the bookkeeping capture and kNN need.

Every column of the cache (one cached token) carries, per batch element:
whether it is real or padding, its original position (RoPE position; kNN
filtering removes columns but never renumbers the rest), the token id it came
from (`LATENT` for latent steps), and the segment it belongs to (which agent's
prompt or latent steps). Batches are left-padded; padding columns are masked
out of attention, so each problem's real columns do not depend on its batch.
The keys and values live in per-layer buffers (`kv_storage`) that the static steps
step on too, so the cache is held once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import graph_prefill, packed_prefill
from .compiled_prefill import compiled_forward, hooked, plain_head
from .handoff import LATENT, PAD
from .kv_storage import BufferCache, cache_kwarg, storage_for
from .models import LoadedModel
from .prefill_attention import grouped_prefill

__all__ = ["LATENT", "PAD", "SegmentKey", "SharedCache", "cache_kwarg"]


# The SDPA kernels `extend` may use (prompt prefills, and the plain path's one-token steps; None:
# torch's choice). With torch's choice an H200 paid for every new shape, which every batch of prompts
# brings; without cuDNN it did not (bench/prefill_probe.py, docs/performance.md, session 15).
PREFILL_BACKENDS: list | None = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Whether `extend`'s eager and compiled forwards attend on the unrepeated grouped-query keys
# (`prefill_attention`); False: transformers' own SDPA path, which repeats them (benches compare the two),
# and prompts prefilled with their padding (`packed_prefill` attends the grouped way only).
GROUPED_PREFILL = True


def _other_attention(config) -> list[str]:
    """The kinds of attention layer other than full ones a model has: its `layer_types`, or, for a config
    without them (Mistral, Phi-3), "sliding_attention" where it turns a sliding window on."""
    kinds = set(getattr(config, "layer_types", None) or [])
    if not kinds and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        kinds.add("sliding_attention")
    return sorted(kinds - {"full_attention"})


@dataclass(frozen=True)
class SegmentKey:
    """Which agent wrote a column, and how ("prompt" or "latent"; "output" for decoded text)."""

    agent: str
    kind: str


class SharedCache:
    """A cache (`kv_storage.BufferCache`) plus per-column state, all `[batch, T]`.

    mask:        bool, True for real columns
    positions:   long, original position of each column (-1 for padding)
    token_ids:   long, token id, `LATENT` or `PAD`
    segment_ids: long, index into `segments`

    capacity: columns to make room for at once (e.g. every prompt, latent step and decoded token
    of a problem); without it the buffers start small and grow as needed.
    compiled: run `extend`'s forward passes compiled (`compiled_prefill`) where nothing hooks the model.
    graphed: run `extend`'s prompt prefills as replayed chunks (`graph_prefill`; CUDA graphs on GPUs)
    where nothing hooks the model and the batch has at most `graph_prefill.BATCH_LIMIT` rows; the
    forwards the chunks leave (more rows, one column, hooks) are `compiled` where that is asked for.
    packed: run a left-padded prompt's forward on its real tokens only (`packed_prefill`) where it can.
    """

    def __init__(self, lm: LoadedModel, batch_size: int, capacity: int | None = None, compiled: bool = False,
                 graphed: bool = False, packed: bool = True):
        other = _other_attention(lm.config)
        if other:
            raise ValueError(f"model {lm.name!r} has {', '.join(other)} layers; the shared cache supports "
                             "full-attention layers only")
        self.lm = lm
        self.storage = storage_for(lm, batch_size, capacity or 1, self)
        self.cache = BufferCache(self.storage, lm.num_layers)
        self._restore_points = 0
        device = lm.device
        empty = lambda dtype: torch.zeros(batch_size, 0, dtype=dtype, device=device)  # noqa: E731
        self.mask = empty(torch.bool)
        self.positions = empty(torch.long)
        self.token_ids = empty(torch.long)
        self.segment_ids = empty(torch.long)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.segments: list[SegmentKey] = []
        self._decoder = lm.model.base_model
        self.compiled = compiled
        self.graphed = graphed
        self.packed = packed
        self.watchers: list = []  # prefill probes the next graphed prefill hands its queries to (`watch`)
        self._cache_kwarg = cache_kwarg(self._decoder)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """T, the number of columns (padding included)."""
        return self.mask.shape[1]

    def layer_keys(self) -> list[torch.Tensor]:
        """Per layer `[batch, kv_heads, T, head_dim]`."""
        return [layer.keys for layer in self.cache.layers]

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more columns (a static step checks its buffers are still these)."""
        self.storage.grow(self.length + extra)

    def watch(self, probe) -> bool:
        """Hand the next prefill's queries to `probe` (a `prefill.PrefillProbe`) instead of its hooks, where
        that prefill runs in graphed chunks (`graph_prefill.watchable`); False where the probe must hook it."""
        if not (self.graphed and graph_prefill.watchable(self)):
            return False
        self.watchers.append(probe)
        return True

    def unwatch(self, probe) -> None:
        if probe in self.watchers:
            self.watchers.remove(probe)

    def _segment_index(self, segment: SegmentKey) -> int:
        if segment not in self.segments:
            self.segments.append(segment)
        return self.segments.index(segment)

    @torch.no_grad()
    def extend(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor,
        token_ids: torch.Tensor,
        segment: SegmentKey,
        logits: bool = False,
    ) -> torch.Tensor:
        """Run the model on new columns and append them to the cache.

        inputs_embeds: [batch, n, hidden]; mask: [batch, n] bool (left padding);
        token_ids: [batch, n] (`LATENT` for latent steps).
        Returns the last column's final hidden state `[batch, hidden]` (after the
        final norm), or its next-token logits `[batch, vocab]` when `logits=True`.
        The last column must be real for every batch element.
        """
        mask = mask.to(torch.bool)
        positions = self._positions(mask)
        kwargs = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": torch.cat([self.mask, mask], dim=1).long(),
            "position_ids": positions,
            self._cache_kwarg: self.cache,
            "use_cache": True,
        }
        backends = sdpa_kernel(PREFILL_BACKENDS) if PREFILL_BACKENDS else contextlib.nullcontext()
        grouped = grouped_prefill(self.lm.model) if GROUPED_PREFILL else contextlib.nullcontext()
        with backends, grouped:
            result = self._graphed(inputs_embeds, mask, positions, logits) if self.graphed else None
            if result is None:  # the chunks did not run: the probes hook the eager forward after all
                for probe in self.watchers:
                    probe.add_hooks()
            self.watchers = []
            if result is None and self.packed and GROUPED_PREFILL and packed_prefill.packable(self, mask, logits):
                result = packed_prefill.forward(self, inputs_embeds, mask, positions, logits, self.compiled,
                                                self._cache_kwarg)
            if result is None and self.compiled:
                result = compiled_forward(self.lm.model, self._decoder, kwargs, logits)
            if result is None and logits:
                result = self.lm.model(**kwargs, logits_to_keep=1).logits[:, -1, :]
            elif result is None:
                result = self._decoder(**kwargs).last_hidden_state[:, -1, :]
        self._note(mask, positions, token_ids, segment)
        return result

    def _graphed(self, inputs_embeds, mask, positions, logits: bool) -> torch.Tensor | None:
        """`extend`'s forward through `graph_prefill` (prompts only: one column goes eagerly), or None
        where it must run eagerly (hooks on the model, a head that does more, another cache on the storage)."""
        head = plain_head(self.lm.model) if logits else None
        if inputs_embeds.shape[1] < 2 or hooked(self.lm.model) or (logits and head is None):
            return None
        hidden = graph_prefill.prefill(self, inputs_embeds, mask, positions, self.watchers)
        if hidden is None or not logits:
            return hidden
        return head(hidden[:, None, :])[:, -1, :]

    def adopt(self, kv, count: int, token_id: int, segment: SegmentKey) -> None:
        """Take in `count` columns a static step (`fast_decode.StaticKV` on this cache's storage)
        wrote after this cache's T: slots T .. T + count - 1, already in place."""
        if kv.keys[0] is not self.storage.keys[0]:
            raise RuntimeError("the static step's buffers are not this cache's storage")
        for layer in self.cache.layers:
            layer.set_length(self.length + count)
        mask = torch.ones(self.batch_size, count, dtype=torch.bool, device=self.mask.device)
        token_ids = torch.full((self.batch_size, count), token_id, dtype=torch.long, device=self.mask.device)
        self._note(mask, self._positions(mask), token_ids, segment)

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Positions `[batch, n]` for new columns: counting on from each row's last real one (padding: 0)."""
        positions = self.next_position[:, None] + mask.long().cumsum(dim=1) - 1
        return positions.masked_fill(~mask, 0)

    def _note(self, mask, positions, token_ids, segment: SegmentKey) -> None:
        """Append the bookkeeping of new columns `[batch, n]` (their keys/values are already cached)."""
        self.mask = torch.cat([self.mask, mask], dim=1)
        self.positions = torch.cat([self.positions, positions.masked_fill(~mask, -1)], dim=1)
        self.token_ids = torch.cat([self.token_ids, token_ids.masked_fill(~mask, PAD)], dim=1)
        index = self._segment_index(segment)
        self.segment_ids = torch.cat([self.segment_ids, torch.full_like(token_ids, index)], dim=1)
        self.next_position = self.next_position + mask.long().sum(dim=1)

    @torch.no_grad()
    def keep(self, keep: torch.Tensor, renumber: bool = False) -> None:
        """Keep only the columns where `keep` [batch, T] is True, in their original order.

        Rows keep different numbers of columns, so each row is packed to the right
        and left-padded to the longest row; every layer's keys and values follow.
        Kept columns keep their positions (their keys carry that RoPE phase). New columns
        count on from the last original position; with `renumber` (the kNN-latentMAS fork's
        behaviour) they restart at the row's number of kept columns instead.
        """
        if self._restore_points:
            raise RuntimeError("keep() rewrites the cache in place; it cannot run inside restored()")
        keep = keep & self.mask
        new_length = int(keep.sum(dim=1).max())
        # A stable sort on the flag moves kept columns to the end, in order.
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, self.length - new_length:]
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            keys, values = layer.keys.gather(2, index), layer.values.gather(2, index)
            layer.set_length(new_length)
            layer.keys.copy_(keys)
            layer.values.copy_(values)
        self.mask = keep.gather(1, order)
        self.positions = self.positions.gather(1, order).masked_fill(~self.mask, -1)
        self.token_ids = self.token_ids.gather(1, order).masked_fill(~self.mask, PAD)
        self.segment_ids = self.segment_ids.gather(1, order)
        if renumber:
            self.next_position = self.mask.sum(dim=1)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Undo whatever the block appends to this cache (its columns and every cache layer); copy-free.

        Appended columns are written after the cached ones, which stay as they are, so putting
        back each layer's length (and views) undoes them; `keep`, which rewrites the cached
        columns, is refused inside the block.
        """
        state = dict(vars(self))
        segments = list(self.segments)
        layers = [(layer, dict(vars(layer))) for layer in self.cache.layers]
        self._restore_points += 1
        try:
            yield
        finally:
            for layer, saved in layers:
                vars(layer).update(saved)
                layer.set_length(layer.length)  # views of the buffers as they are now (they may have grown)
            vars(self).update(state)
            self.segments = segments

    def real_columns(self, row: int) -> torch.Tensor:
        """Indices of the real columns of one batch element, `[T_row]`."""
        return self.mask[row].nonzero().squeeze(1)
