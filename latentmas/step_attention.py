"""Attention for one new token over a static buffer, without copying keys for every query head.

Given a mask, transformers' SDPA path repeats each key/value head once per query head of its
group (`repeat_kv`) before calling the kernel: for Qwen3-4B at batch size 16 that is two
copies per layer of every cached key and value, each step, and it dominated the graph-replayed
step (measured with `bench/decode_probe.py --batch 16`). With a single new token the query
heads of one group can be read as that group's query rows instead: one SDPA call on the
unrepeated keys, with the mask broadcast over the rows. Same maths, no copies.

On CUDA (with triton) the step attends through `kernels.decode_attention` instead, a split-KV
(flash-decoding) kernel that reads only the slots written so far: the step passes a `StepMask`
(the slot mask and how many slots are written) under its own keyword (`STEP_MASK`), which models
pass through to their attention layers. Elsewhere, or with LATENTMAS_DECODE_KERNEL=0, it is the
SDPA call above.

`fast_decode.StaticStep` and `graph_prefill.PrefillChunk` switch a model to it around their own forward
passes only; a chunk's n query rows per head are read the same way, as `groups * n` rows of their group.
(`flex_attention` in its place, compiled, was slower on an H200: 8.8 against 5.7 ms per
Qwen3-4B step at batch size 1, see docs/performance.md.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kernels import available as kernel_available
from .kernels import decode_attention

NAME = "latentmas_grouped_step"
STEP_MASK = "latentmas_step_mask"  # the keyword a static step's `StepMask` travels under


class StepMask(NamedTuple):
    """What a static step attends: `allowed` bool `[batch, capacity]` (True where a slot may be read)
    and `length`, int64 `[1]` on the device: slots at or past it hold nothing yet. A chunk of n
    columns (`graph_prefill`) also gives `rows`, the additive mask `[batch, 1, groups * n, capacity]`
    of its query rows laid out as below (a GQA group's heads one after the other)."""

    allowed: torch.Tensor
    length: torch.Tensor
    rows: torch.Tensor | None = None


def use_kernel(device: torch.device) -> bool:
    """Whether steps attend through the triton kernel: on CUDA when triton imports, unless
    LATENTMAS_DECODE_KERNEL=0."""
    return device.type == "cuda" and kernel_available() and os.environ.get("LATENTMAS_DECODE_KERNEL", "1") != "0"


def grouped_step_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one token per row, each query head reading its own GQA group's keys.

    query `[batch, heads, 1, head_dim]`; key, value `[batch, kv_heads, capacity, head_dim]`
    (head h reads kv head h // (heads / kv_heads), as in `repeat_kv`); attention_mask a
    `StepMask` (or one under the `STEP_MASK` keyword, which wins), or bool `[batch, 1, 1, capacity]`,
    True where a slot may be attended.
    Returns `[batch, 1, heads, head_dim]` (transformers' layout) and no weights.
    A `StepMask` with `rows` (a prefill chunk, `graph_prefill`) takes n tokens per row instead:
    query `[batch, heads, n, head_dim]` -> `[batch, n, heads, head_dim]`.
    """
    batch, heads, length, dim = query.shape
    attention_mask = kwargs.get(STEP_MASK, attention_mask)
    if attention_mask is None:
        raise ValueError("grouped_step_attention needs the step's mask; it got none")
    if isinstance(attention_mask, StepMask) and attention_mask.rows is not None:
        return grouped_rows_attention(query, key, value, attention_mask.rows, scaling), None
    if length != 1:
        raise ValueError(f"grouped_step_attention takes one token per row without a chunk's mask, got {length}")
    if isinstance(attention_mask, StepMask):
        if use_kernel(query.device):
            scale = scaling if scaling is not None else dim ** -0.5
            output = decode_attention(query[:, :, 0], key, value, attention_mask.allowed, attention_mask.length, scale)
            return output[:, None], None
        attention_mask = attention_mask.allowed[:, None, None, :]
    kv_heads = key.shape[1]
    rows = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    output = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2), None


def grouped_rows(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A mask `[batch, 1, n, T]` as the mask of a group's query rows `[batch, 1, groups * n, T]`
    (row j * n + i is token i's row for the group's head j, as `grouped_rows_attention` lays them out)."""
    batch, _, n, length = mask.shape
    return mask[:, :, None].expand(batch, 1, groups, n, length).reshape(batch, 1, groups * n, length)


def grouped_rows_attention(query, key, value, rows, scaling) -> torch.Tensor:
    """n tokens per row: query `[batch, heads, n, head_dim]` read as `[batch, kv_heads, groups * n,
    head_dim]`, one SDPA call on the unrepeated keys and values `[batch, kv_heads, T, head_dim]` with
    `rows` `[batch, 1, groups * n, T]` as its mask (row j * n + i: token i of the group's head j; e.g.
    `StepMask.rows`, `grouped_rows`). Returns `[batch, n, heads, head_dim]`."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=rows, scale=scaling)
    return output.reshape(batch, heads, length, dim).transpose(1, 2)


AttentionInterface.register(NAME, grouped_step_attention)


@contextmanager
def attending(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Within this block, `model`'s attention layers use the implementation registered under `name`
    (`AttentionInterface.register`); its own again after."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def grouped_step(model: torch.nn.Module):
    """Within this block, `model`'s attention layers use `grouped_step_attention`."""
    return attending(model, NAME)
