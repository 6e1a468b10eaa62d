"""Attention for one new token over a static buffer, without copying keys for every query head.

Given a mask, transformers' SDPA path repeats each key/value head once per query head of its
group (`repeat_kv`) before calling the kernel: for Qwen3-4B at batch size 16 that is two
copies per layer of every cached key and value, each step, and it dominated the graph-replayed
step (measured with `bench/decode_probe.py --batch 16`). With a single new token the query
heads of one group can be read as that group's query rows instead: one SDPA call on the
unrepeated keys, with the mask broadcast over the rows. Same maths, no copies.

`fast_decode.StaticStep` switches a model to it around its own forward passes only.
(`flex_attention` in its place, compiled, was slower on an H200: 8.8 against 5.7 ms per
Qwen3-4B step at batch size 1, see docs/performance.md.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "latentmas_grouped_step"


def grouped_step_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one token per row, each query head reading its own GQA group's keys.

    query `[batch, heads, 1, head_dim]`; key, value `[batch, kv_heads, capacity, head_dim]`
    (head h reads kv head h // (heads / kv_heads), as in `repeat_kv`); attention_mask bool
    `[batch, 1, 1, capacity]`, True where a slot may be attended.
    Returns `[batch, 1, heads, head_dim]` (transformers' layout) and no weights.
    """
    batch, heads, length, dim = query.shape
    if length != 1:
        raise ValueError(f"grouped_step_attention takes one token per row, got {length}")
    kv_heads = key.shape[1]
    rows = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    output = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(NAME, grouped_step_attention)


@contextmanager
def grouped_step(model: torch.nn.Module) -> Iterator[None]:
    """Within this block, `model`'s attention layers use `grouped_step_attention`."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = saved
