"""Where the shared cache's keys and values live: per-layer buffers with room to grow, behind transformers' cache API.

The shared cache used to be a `DynamicCache` (each prefill concatenated into new tensors) with the
static steps' buffers beside it, so a batch held its cache twice: at batch size 64 on Qwen3-4B that
was ~11 GB more than needed. Here every layer's keys and values are written into one buffer each,
`[batch, kv_heads, capacity, head_dim]`: a prefill writes its columns after the cached ones
(`BufferLayer.update`), and the static steps (`fast_decode`) step on the same buffers, so latent
steps leave their columns where the cache reads them and nothing is copied in or out.

A model keeps the storage of its last batch (`LoadedModel.kv_storage`) and lends it to the next
batch of the same size when it is free and big enough, so the steps' recorded CUDA graphs (which
hold the buffers' addresses) are reused. A storage is lent to one `SharedCache` at a time (a weak
reference to it): while that one is alive, another cache gets storage of its own.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

GRANULE = 128  # buffers grow in steps of this many columns
SMALLEST = 256


def cache_kwarg(module: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def capacity_for(needed: int) -> int:
    """Columns to allocate for `needed`: an eighth more, rounded up to GRANULE, at least SMALLEST.

    The eighth lets later batches, whose prompts are a little longer, reuse the storage (and the
    steps' graphs recorded on it) instead of allocating anew.
    """
    wanted = needed + needed // 8
    return max(SMALLEST, -(-wanted // GRANULE) * GRANULE)


class KVStorage:
    """Per-layer key and value buffers `[batch, kv_heads, capacity, head_dim]`, zeroed when made.

    Separate tensors per layer (not views of one), so a compiled step sees no aliased inputs.
    `grow` moves everything into bigger buffers; whoever holds the old ones (a step's recorded
    graph) keeps valid but stale copies, so a step checks `StaticKV.current()` before reuse.
    """

    def __init__(self, lm, batch: int, capacity: int):
        self.batch = batch
        self.dtype = lm.dtype
        self.device = lm.device
        self._shape = (batch, lm.num_kv_heads, capacity, lm.head_dim)
        self.keys = [self._zeros() for _ in range(lm.num_layers)]
        self.values = [self._zeros() for _ in range(lm.num_layers)]
        self._owner = None

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self._shape, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self._shape[2]

    def fits(self, lm, batch: int, needed: int) -> bool:
        return (self.batch, self.dtype, self.device) == (batch, lm.dtype, lm.device) and self.capacity >= needed

    @property
    def lent(self) -> bool:
        return self._owner is not None and self._owner() is not None

    def lend_to(self, owner) -> KVStorage:
        self._owner = weakref.ref(owner)
        return self

    @torch.no_grad()
    def grow(self, needed: int) -> None:
        """Make room for `needed` columns (at least doubling), keeping every written column."""
        if needed <= self.capacity:
            return
        old = self.capacity
        self._shape = (*self._shape[:2], max(capacity_for(needed), 2 * old), self._shape[3])
        for buffers in (self.keys, self.values):
            for i, buffer in enumerate(buffers):
                grown = self._zeros()
                grown[:, :, :old].copy_(buffer)
                buffers[i] = grown


def storage_for(lm, batch: int, needed: int, owner) -> KVStorage:
    """Storage for `owner` with room for `needed` columns: the model's free storage when it fits, else new.

    New storage becomes the model's when the old one is free (the old one, and the steps built on
    it, are dropped first, so the two are never allocated at once).
    """
    pooled = lm.kv_storage
    if pooled is not None and not pooled.lent:
        if pooled.fits(lm, batch, needed):
            return pooled.lend_to(owner)
        lm.kv_storage = None
        lm.static_steps.clear()
        del pooled
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
    storage = KVStorage(lm, batch, capacity_for(needed))
    if lm.kv_storage is None:  # the model's, unless another cache still holds the model's
        lm.kv_storage = storage
    return storage.lend_to(owner)


class BufferLayer(DynamicLayer):
    """One layer of the cache on a `KVStorage`: `keys`/`values` are views of its first `length` columns.

    `update` writes new columns `[batch, kv_heads, n, head_dim]` after the cached ones (growing the
    storage when full) and returns the views `[batch, kv_heads, length, head_dim]`, as `DynamicLayer`
    would return its concatenation.
    """

    def __init__(self, storage: KVStorage, index: int):
        super().__init__()
        self.storage = storage
        self.index = index
        self.device = storage.device
        self.is_initialized = True
        self.set_length(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist from the start."""

    def set_length(self, length: int) -> None:
        """Point `keys`/`values` at the first `length` columns (already written)."""
        self.length = length
        self.keys = self.storage.keys[self.index][:, :, :length]
        self.values = self.storage.values[self.index][:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.storage.grow(end)
        self.storage.keys[self.index][:, :, self.length:end].copy_(key_states)
        self.storage.values[self.index][:, :, self.length:end].copy_(value_states)
        self.set_length(end)
        return self.keys, self.values

    def update_packed(self, key_states: torch.Tensor, value_states: torch.Tensor, rows: torch.Tensor,
                      columns: torch.Tensor, width: int):
        """`update` for a packed prefill (`packed_prefill`): key_states, value_states `[1, kv_heads, N,
        head_dim]` go to slots length + columns[k] of rows[k] among `width` new columns; the new columns'
        other slots (padding) are zeroed. Returns the views, as `update` does."""
        end = self.length + width
        self.storage.grow(end)
        for buffers, states in ((self.storage.keys, key_states), (self.storage.values, value_states)):
            slots = buffers[self.index][:, :, self.length:end]
            slots.zero_()
            slots.transpose(1, 2)[rows, columns] = states[0].transpose(0, 1)
        self.set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class BufferCache(Cache):
    """transformers' `Cache` over a `KVStorage`, one `BufferLayer` per decoder layer."""

    def __init__(self, storage: KVStorage, num_layers: int):
        super().__init__(layers=[BufferLayer(storage, i) for i in range(num_layers)])
        self.storage = storage
        self.packing: tuple | None = None  # (rows, columns, width) inside `packed`

    @contextlib.contextmanager
    def packed(self, rows: torch.Tensor, columns: torch.Tensor, width: int) -> Iterator[None]:
        """Inside the block, `update` takes packed states (`BufferLayer.update_packed`): the forward of a
        prompt `[batch, width]` on its real tokens only, token k being token columns[k] of row rows[k]."""
        self.packing = (rows, columns, width)
        try:
            yield
        finally:
            self.packing = None

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """`Cache.update`, never traced: a compiled layer (`compiled_prefill`) leaves the write to run
        eagerly between its pieces, so the layer's index and the cache's length are no part of its graphs."""
        if self.packing is not None:
            return self.layers[layer_idx].update_packed(key_states, value_states, *self.packing)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
