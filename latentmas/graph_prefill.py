"""Prompt prefills as replayed CUDA graphs of fixed-size chunks, on the shared cache's own buffers.

An eager prefill at small batch sizes is bound by the host: transformers' forward issues about 50
ops that run kernels per decoder layer, one by one from Python. On an H200 an eager 150 to 260-token
prefill of Qwen3-4B at batch size 1 took 65.7 to 77.0 ms, of which the host took 65.6 to 76.9; in
graphed chunks 13.6 to 14.0 ms, 3.9 to 4.6 of them the host's (`bench/prefill_probe.py --graphed`,
docs/performance.md, 2026-12-03). Here a prompt of n columns `[batch, n]` goes
through the model in chunks of fixed sizes (multiples of `QUANTUM`, at most `largest_chunk`), and
each chunk is one forward pass recorded once as a CUDA graph per size and replayed, the way
`fast_decode` replays its one-token steps:

- the chunk's keys and values are written at slots `write_index + 0 .. size - 1` of the buffers
  the steps step on (`fast_decode.StaticKV`), so the cache holds them once, where it reads them;
- the last chunk is usually only partly real: its rows past the prompt compute something that is
  written after the cache's end, never counted in, and overwritten by whatever comes next;
- attention (`step_attention.grouped_step_attention` given `StepMask.rows`) reads the whole buffer
  through a mask: a row sees the cache's real columns and the chunk's columns up to its own
  (causal), each row its own slot too (so that padding rows see one slot, not none); slots past the
  cache are cleared first, since a masked slot is weighed by 0 and 0 x NaN is NaN.

The cache, its bookkeeping and the returned state are those of `SharedCache.extend`'s eager
forward (same maths, kernels of other shapes: equal within float tolerance; `tests/test_graph_prefill.py`).
A prefill runs this way when the fast path is on (`SharedCache(graphed=True)`, which `latent_mas`
and the text methods ask for on CUDA unless `--eager_prefill`), for batches of at most `BATCH_LIMIT`
rows (see `prefill`), and where nothing hooks the model: hooks would not run in a replayed graph,
so a hooked model prefills eagerly. kNN's scoring pass hooks its prefill (it stops after one layer).
Capture's `query` and `attention` probes (`prefill.PrefillProbe`) ask the cache instead
(`SharedCache.watch`): a watched prefill runs in chunks whose forward also copies every layer's
pre-RoPE queries into a buffer (the copies are recorded into the graph), and once the keys are
cached the probes take those queries (`PrefillProbe.take_prefill`); where the chunks do not run
after all, the probes hook the eager forward. On the CPU the chunks run eagerly (no graph), which is
how the tests check them against the plain forward; on CUDA `tests/test_cuda.py` checks the
replayed graphs' captures against hooked eager prefills.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from functools import partial

import torch

from .fast_decode import StaticKV, built, model_kv, record, use_fast
from .kv_storage import cache_kwarg
from .prefill import attention_modules, query_source
from .step_attention import STEP_MASK, StepMask, grouped_rows, grouped_step, use_kernel

BATCH_LIMIT = 4  # batches of more rows prefill eagerly (see `prefill`)
QUANTUM = 32  # chunk sizes are multiples of this many columns
LARGEST = 512  # and at most this many
TOKENS = 16384  # nor more than this many rows x columns (the activations' size)


def largest_chunk(batch: int) -> int:
    """The longest chunk for `batch` rows: `LARGEST`, less at large batches (`TOKENS`), at least `QUANTUM`."""
    return max(QUANTUM, min(LARGEST, TOKENS // batch // QUANTUM * QUANTUM))


def chunk_sizes(columns: int, batch: int) -> list[int]:
    """The chunks a prefill of `columns` goes in: full ones of `largest_chunk(batch)`, then the rest
    rounded up to a multiple of `QUANTUM` (e.g. 200 -> [224], 600 at batch size 1 -> [512, 96])."""
    largest, sizes = largest_chunk(batch), []
    while columns > 0:
        sizes.append(min(largest, -(-columns // QUANTUM) * QUANTUM))
        columns -= sizes[-1]
    return sizes


class ChunkKV:
    """A `StaticKV` as transformers' cache for one chunk: `update` writes the chunk's columns
    `[batch, kv_heads, size, head_dim]` at `slots` `[size]` and returns the whole buffers."""

    def __init__(self, kv: StaticKV, slots: torch.Tensor):
        self.kv = kv
        self.slots = slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv.keys[layer_idx].index_copy_(2, self.slots, key_states)
        self.kv.values[layer_idx].index_copy_(2, self.slots, value_states)
        return self.kv.keys[layer_idx], self.kv.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.capacity


class PrefillChunk:
    """One forward pass over `size` new columns per row at `kv.write_index`, recorded as a CUDA graph.

    Static inputs, filled by `run`: `input` `[batch, size, hidden]` (input embeddings), `position`
    `[batch, size]` (RoPE positions), `columns` `[batch, size]` bool (False: padding, or past the
    prompt). Output: the final hidden states `[batch, size, hidden]` (after the final norm), a static
    tensor that the next replay of any step or chunk may overwrite. watched: the forward also copies
    every layer's pre-RoPE queries into `queries` `[num_layers, batch, size, heads, head_dim]`, a view
    of one buffer that every watched chunk on `kv` shares (read it before the next replay).
    """

    def __init__(self, lm, kv: StaticKV, size: int, use_graph: bool | None = None, watched: bool = False):
        device, batch = lm.device, kv.mask.shape[0]
        self.lm, self.kv, self.size = lm, kv, size
        self.queries = _query_buffer(lm, kv)[:, :, :size] if watched else None
        self.input = torch.zeros(batch, size, lm.hidden_size, dtype=lm.dtype, device=device)
        self.position = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.columns = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.offsets = torch.arange(size, device=device)
        self.slot_ids = torch.arange(kv.capacity, device=device)
        self.groups = lm.model.config.num_attention_heads // lm.num_kv_heads
        self._cache_kwarg = cache_kwarg(lm.model.base_model)
        self.graph = self.output = None
        if use_fast(device, use_graph):
            # the warm-ups write only where the replay writes again: `kv` points at the cache's end
            self.graph, self.output = record(self._forward, device)

    def _bias(self, slots: torch.Tensor) -> torch.Tensor:
        """The additive attention mask `[batch, 1, groups * size, capacity]` of the chunk's query rows
        (as `grouped_step_attention` lays them out: a GQA group's heads one after the other)."""
        reach = self.slot_ids[None, :] <= slots[:, None]  # [size, capacity]: the causal part
        own = self.slot_ids[None, :] == slots[:, None]
        allowed = (self.kv.mask[:, None, :] & reach) | own  # [batch, size, capacity]
        bias = torch.zeros(allowed.shape, dtype=self.lm.dtype, device=allowed.device)
        bias.masked_fill_(~allowed, float("-inf"))
        return grouped_rows(bias[:, None], self.groups)

    def _forward(self) -> torch.Tensor:
        slots = self.kv.write_index + self.offsets
        self.kv.mask.index_copy_(1, slots, self.columns)
        mask = StepMask(self.kv.mask, slots[-1:] + 1, self._bias(slots))
        kwargs = {"inputs_embeds": self.input, "position_ids": self.position, "use_cache": True,
                  self._cache_kwarg: ChunkKV(self.kv, slots), STEP_MASK: mask}
        with grouped_step(self.lm.model), self._keeping_queries():
            return self.lm.model.base_model(**kwargs).last_hidden_state

    @contextlib.contextmanager
    def _keeping_queries(self) -> Iterator[None]:
        """For a watched chunk, hooks that copy each layer's pre-RoPE queries into `queries` (recorded into
        the graph as copies, so every replay makes them; the hooks are gone after the forward)."""
        if self.queries is None:
            yield
            return
        batch, size = self.columns.shape

        def keep(index, module, args, output):
            self.queries[index].copy_(output.reshape(batch, size, -1, self.lm.head_dim))

        handles = [query_source(module).register_forward_hook(partial(keep, index))
                   for index, module in enumerate(attention_modules(self.lm))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prefill up to `size` columns (`embeds` `[batch, m, hidden]`, `positions` and `mask` `[batch, m]`,
        m ≤ size) at the write index; returns the final hidden states `[batch, size, hidden]`
        (rows past m are no prompt's)."""
        real = embeds.shape[1]
        self.input[:, :real].copy_(embeds)
        self.position[:, :real].copy_(positions)
        self.columns[:, :real].copy_(mask)
        self.columns[:, real:] = False
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.output


_QUERY_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # StaticKV -> its watched chunks' queries


def _query_buffer(lm, kv: StaticKV) -> torch.Tensor:
    """The queries buffer `[num_layers, batch, largest_chunk(batch), heads, head_dim]` of `kv`'s watched chunks."""
    if kv not in _QUERY_BUFFERS:
        batch = kv.mask.shape[0]
        shape = (lm.num_layers, batch, largest_chunk(batch), lm.model.config.num_attention_heads, lm.head_dim)
        _QUERY_BUFFERS[kv] = torch.zeros(shape, dtype=lm.dtype, device=lm.device)
    return _QUERY_BUFFERS[kv]


def watchable(shared) -> bool:
    """Whether `shared`'s next prefill can hand its queries to prefill probes (`SharedCache.watch`): it
    will run in chunks (the model's storage, at most `BATCH_LIMIT` rows) and the model has the rotary
    embedding the probes' RoPE comes from."""
    return _in_chunks(shared) and getattr(shared.lm.model.base_model, "rotary_emb", None) is not None


def _in_chunks(shared) -> bool:
    """Whether `prefill` runs `shared`'s prefills in chunks: on the model's storage, at most `BATCH_LIMIT` rows."""
    return shared.storage is shared.lm.kv_storage and shared.batch_size <= BATCH_LIMIT


def prefill(shared, inputs_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
            probes: Sequence = ()) -> torch.Tensor | None:
    """Write the keys and values of a prompt's n columns after `shared`'s and count them in.

    inputs_embeds `[batch, n, hidden]`, mask and positions `[batch, n]` (as `SharedCache.extend`
    makes them). probes: `prefill.PrefillProbe`s to hand every layer's queries to, once the keys are
    cached (chunks recorded with those queries kept). Returns the last column's final hidden state
    `[batch, hidden]`, or None where the
    cache is not on the model's storage (another cache holds it) or the batch has more than
    `BATCH_LIMIT` rows: then nothing was done. The bookkeeping of the new columns (mask,
    positions, segments) is the caller's.

    Why the limit: chunks attend over the whole buffer, which holds room for the whole problem, so
    early prompts attend over many empty slots, and the last chunk pads the prompt; where the eager
    prefill is bound by the GPU rather than the host this costs more than the graph saves. On an H200
    (Qwen3-4B shapes, `bench/latentmas_speed.py --eager_prefill_at`, 2026-12-03) graphed prefills took
    0.90x the time per problem of eager ones at batch size 1 and 1.03x at 16 (one run, two passes
    each); the limit between is a choice, not a measurement.
    """
    lm, columns = shared.lm, inputs_embeds.shape[1]
    if not _in_chunks(shared):
        return None
    sizes = chunk_sizes(columns, shared.batch_size)
    shared.reserve(sum(sizes))  # grows the storage in place (it stays the model's); the kv comes after
    kv = model_kv(lm, shared)
    watched = bool(probes)
    for size in sorted(set(sizes)):  # recorded before any runs: recording writes past the cache's end
        if ("prefill", size, watched) not in lm.static_steps:
            lm.static_steps[("prefill", size, watched)] = built(PrefillChunk, lm, kv, shared,
                                                                {"size": size, "watched": watched})
    kv.load(shared)
    start, done, queries = shared.length, 0, []
    if use_kernel(lm.device):  # `load` leaves the slots past the cache as an earlier batch left them
        torch._foreach_zero_([buffer[:, :, start:] for buffer in (*kv.keys, *kv.values)])
    for size in sizes:
        real = min(size, columns - done)
        piece = slice(done, done + real)
        chunk = lm.static_steps[("prefill", size, watched)]
        hidden = chunk.run(inputs_embeds[:, piece], positions[:, piece], mask[:, piece])
        if watched:
            queries.append(chunk.queries[:, :, :real].clone())
        done += real
        kv.write_index += real
    for layer in shared.cache.layers:
        layer.set_length(start + columns)
    if watched:
        queries = queries[0] if len(queries) == 1 else torch.cat(queries, dim=2)
        cos, sin = lm.model.base_model.rotary_emb(inputs_embeds, positions)
        for probe in probes:
            probe.take_prefill(queries, cos, sin)
    return hidden[:, real - 1].clone()
