"""Attention for one new token over a static buffer, without copying keys for every query head.

Given a mask, transformers' SDPA path repeats each key/value head once per query head of its
group (`repeat_kv`) before calling the kernel: for Qwen3-4B at batch size 16 that is two
copies per layer of every cached key and value, each step, and it dominated the graph-replayed
step (measured with `bench/decode_probe.py --batch 16`). With a single new token the query
heads of one group can be read as that group's query rows instead: one SDPA call on the
unrepeated keys, with the mask broadcast over the rows. Same maths, no copies.

Two kernels compute it: "sdpa" (`F.scaled_dot_product_attention`, what eager steps use) and
"flex" (`flex_attention` with grouped-query heads and the mask as a score modifier; under
torch.compile inductor turns it into one split-KV decoding kernel, where cuDNN's SDPA kernel
took 43 us a layer for one token over 2,048 slots on an H200, `bench/decode_probe.py`).

`fast_decode.StaticStep` switches a model to one of them around its own forward passes only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from transformers import AttentionInterface

NAME = "latentmas_grouped_step"
KERNELS = ("sdpa", "flex")


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


def flex_step_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`grouped_step_attention` through `flex_attention`: same shapes and result; meant to be compiled."""
    if query.shape[2] != 1:
        raise ValueError(f"flex_step_attention takes one token per row, got {query.shape[2]}")
    allowed = attention_mask[:, 0, 0, :]  # [batch, capacity]

    def masked(score, b, h, q, kv):
        return torch.where(allowed[b, kv], score, -float("inf"))

    output = flex_attention(query, key, value, score_mod=masked, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2), None


AttentionInterface.register(NAME, grouped_step_attention)
AttentionInterface.register(f"{NAME}_flex", flex_step_attention)


@contextmanager
def grouped_step(model: torch.nn.Module, kernel: str = "sdpa") -> Iterator[None]:
    """Within this block, `model`'s attention layers use `grouped_step_attention` ("sdpa") or
    `flex_step_attention` ("flex")."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown step attention kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    saved = model.config._attn_implementation
    model.config._attn_implementation = NAME if kernel == "sdpa" else f"{NAME}_flex"
    try:
        yield
    finally:
        model.config._attn_implementation = saved
