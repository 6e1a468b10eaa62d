"""Fast stepping: a static KV buffer, one fixed-shape step, replayed as a CUDA graph.

Decoding one token at a time through transformers' eager forward costs far more
in Python and kernel launches than in GPU work (a 4B model reads ~8 GB of weights
per step: ~2 ms of bandwidth, but the eager step takes tens of ms). Here the
shared cache is copied once into buffers with room for the whole answer, and
every step has the same shapes and addresses: the new key/value is written at a
device-side index, attention sees all slots through a mask, and nothing talks to
the host. On CUDA the step (embedding -> model -> last logits) is captured once
as a CUDA graph and replayed; on the CPU the same step runs eagerly, which is how
tests check that it decodes exactly what the plain loop decodes. Decoding and latent
steps both use it (`StaticStep`); latent steps hand their columns back to the shared
cache (`SharedCache.adopt`).
"""

from __future__ import annotations

import torch

from .shared_cache import SharedCache


class StaticKV:
    """Per-layer key/value buffers `[batch, kv_heads, capacity, head_dim]` behind transformers' cache interface.

    `update()` writes the new column at `write_index` (a 1-element device tensor)
    and returns the whole buffers; unwritten slots are hidden by the mask.
    """

    def __init__(self, shared: SharedCache, extra: int):
        self.length = shared.length
        self.capacity = shared.length + extra
        self.keys, self.values = [], []
        for layer in shared.cache.layers:
            self.keys.append(self._buffer(layer.keys))
            self.values.append(self._buffer(layer.values))
        device = shared.mask.device
        self.write_index = torch.tensor([self.length], dtype=torch.long, device=device)
        self.mask = torch.zeros(shared.batch_size, self.capacity, dtype=torch.bool, device=device)
        self.mask[:, : self.length] = shared.mask

    def _buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = tensor.shape
        buffer = torch.zeros(batch, heads, self.capacity, dim, dtype=tensor.dtype, device=tensor.device)
        buffer[:, :, :length] = tensor
        return buffer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_index, key_states)
        self.values[layer_idx].index_copy_(2, self.write_index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity


def use_fast(device: torch.device, setting: bool | None) -> bool:
    """Whether to step on a static buffer: `setting`, or by default only on CUDA."""
    return device.type == "cuda" if setting is None else setting


_CAPTURE: dict = {}  # device -> (side stream, graph memory pool), shared by every capture


def _capture_resources(device: torch.device):
    """One warm-up stream and one graph memory pool per device, reused by every capture.

    A fresh stream per capture would leave a cuBLAS workspace behind each time
    (cuBLAS keeps one per stream), and a fresh pool per graph would fragment memory.
    """
    if device not in _CAPTURE:
        _CAPTURE[device] = (torch.cuda.Stream(device), torch.cuda.graph_pool_handle())
    return _CAPTURE[device]


class StaticStep:
    """One model step with fixed shapes on a static KV buffer.

    tokens=True (decoding): token ids `[batch]` in, next-token logits `[batch, vocab]` out.
    tokens=False (latent steps): input embeddings `[batch, hidden]` in, the last layer's
    final hidden state `[batch, hidden]` out.
    Static inputs (`input`, `position`, the buffers' `write_index` and `mask`) are updated
    in place between steps; `run()` replays the CUDA graph when there is one
    (`use_graph`: by default on CUDA only).
    """

    def __init__(self, lm, shared: SharedCache, extra: int, use_graph: bool | None = None, tokens: bool = True):
        self.lm = lm
        self.tokens = tokens
        self.kv = StaticKV(shared, extra)
        batch = shared.batch_size
        device = shared.mask.device
        if tokens:
            self.input = torch.zeros(batch, 1, dtype=torch.long, device=device)
        else:
            self.input = torch.zeros(batch, 1, lm.hidden_size, dtype=lm.dtype, device=device)
        self.position = shared.next_position[:, None].clone()
        self.steps = 0
        self._cache_kwarg = shared._cache_kwarg
        self._eager_mask = lm.model.config._attn_implementation == "eager"
        self.output = None
        self.graph = None
        if use_fast(device, use_graph):
            self._capture()

    def _forward(self) -> torch.Tensor:
        self.kv.mask.index_fill_(1, self.kv.write_index, True)
        mask = self.kv.mask[:, None, None, :]
        if self._eager_mask:
            zero = torch.zeros((), dtype=self.lm.dtype, device=mask.device)
            mask = torch.where(mask, zero, torch.finfo(self.lm.dtype).min)
        common = {"attention_mask": {"full_attention": mask}, "position_ids": self.position, "use_cache": True,
                  self._cache_kwarg: self.kv}
        if self.tokens:
            return self.lm.model(input_ids=self.input, logits_to_keep=1, **common).logits[:, -1, :]
        return self.lm.model.base_model(inputs_embeds=self.input, **common).last_hidden_state[:, -1, :]

    def _capture(self) -> None:
        """Warm up on a side stream, then record one step into a CUDA graph."""
        saved = (self.kv.write_index.clone(), self.kv.mask.clone(), self.position.clone())
        stream, pool = _capture_resources(self.kv.mask.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.output = self._forward()
        # warm-up and capture wrote into the next slot; restore it so stepping starts clean
        self.kv.write_index.copy_(saved[0])
        self.kv.mask.copy_(saved[1])
        self.position.copy_(saved[2])

    @torch.no_grad()
    def run(self, value: torch.Tensor) -> torch.Tensor:
        """Feed token ids `[batch]` or embeddings `[batch, hidden]` at the next slot; return the output."""
        self.input.copy_(value[:, None])
        if self.graph is not None:
            self.graph.replay()
            output = self.output
        else:
            output = self._forward()
        self.kv.write_index += 1
        self.position += 1
        self.steps += 1
        return output
