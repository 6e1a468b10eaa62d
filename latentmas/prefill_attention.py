"""A prompt prefill's attention on the unrepeated grouped-query keys.

Given a mask, transformers' SDPA path repeats each key/value head once per query head of its group
(`repeat_kv`) before calling the kernel, and a left-padded batch on the shared cache always has a
mask. For Qwen3-4B (8 key/value heads, 4 query heads each) at batch size 64, a 200-token prompt on a
600-column cache, the eager prefill's copies were 69 of its 350 ms of GPU time on an H200, and
compiled (`compiled_prefill`) inductor made the repeat a kernel of 3.5 ms a call, twice a layer
(`bench/prefill_probe.py --profile`, 2026-12-04). Here the query heads of a group
are read as that group's rows (`step_attention.grouped_rows_attention`, as the graphed chunks do): one
SDPA call on the keys and values as cached, with the mask repeated over the group's rows rather than
the keys over the heads. Same maths, other kernel shapes: equal within float tolerance
(`tests/test_prefill_attention.py`).

- The mask: transformers makes it once per forward with the function registered under this
  attention's name, `grouped_rows_mask`: its "sdpa" mask, then (once, not per layer) the additive
  mask of the group's rows `[batch, 1, groups * n, T]`, its rows 16-element aligned so that SDPA
  does not pad it again.
- Compiled, the attention is one opaque op (`latentmas::grouped_rows_attention`): inductor made the
  query's regrouping and the mask's expansion two kernels of 1.4 ms a call each at batch size 64,
  where aten's copies take about 0.1 ms.

`SharedCache.extend` runs its eager and compiled forwards inside `grouped_prefill(model)`, which
switches a model that attends through transformers' "sdpa" to this attention and back. Without a mask
(nothing padded, causal), with one query head per key/value head, or with a mask per head, it is
transformers' own SDPA path.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from . import step_attention
from .step_attention import grouped_rows

NAME = "latentmas_grouped_prefill"
REPLACES = "sdpa"  # the implementation `grouped_prefill` stands in for
ALIGN = 16  # elements a mask row is aligned to (the memory-efficient kernel pads masks that are not)


def additive_rows(allowed: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """bool `[batch, 1, n, T]` (True: attend) -> the additive mask of the group's rows `[batch, 1, groups * n,
    T]` in `dtype` (0 or -inf), each row starting at a multiple of `ALIGN` elements."""
    batch, _, n, length = allowed.shape
    padded = -(-length // ALIGN) * ALIGN
    bias = torch.zeros(batch, 1, groups * n, padded, dtype=dtype, device=allowed.device)[..., :length]
    return bias.masked_fill_(~grouped_rows(allowed, groups), float("-inf"))


def _groups(config) -> int:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv_heads if heads and kv_heads and heads % kv_heads == 0 else 1


def grouped_rows_mask(*args, config=None, dtype=None, **kwargs):
    """transformers' mask interface: the "sdpa" mask, as the additive mask of each group's rows
    (`additive_rows`) where it is a boolean `[batch, 1, n, T]` and the model groups its query heads."""
    mask = ALL_MASK_ATTENTION_FUNCTIONS[REPLACES](*args, config=config, dtype=dtype, **kwargs)
    groups = _groups(config)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1 \
            or groups == 1 or dtype is None:
        return mask
    return additive_rows(mask, groups, dtype)


@torch.library.custom_op("latentmas::grouped_rows_attention", mutates_args=())
def _opaque_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """`grouped_rows_attention` as one op that torch.compile does not look into; contiguous output."""
    return step_attention.grouped_rows_attention(query, key, value, rows, scaling).contiguous()


@_opaque_attention.register_fake
def _(query, key, value, rows, scaling):
    batch, heads, n, dim = query.shape
    return query.new_empty(batch, n, heads, dim)


def grouped_prefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: query `[batch, heads, n, head_dim]`, key and value `[batch,
    kv_heads, T, head_dim]`, attention_mask `[batch, 1, n or groups * n, T' ≥ T]` (bool or additive;
    `groups * n` rows: already the group's rows, `grouped_rows_mask`) or None.
    Returns `[batch, n, heads, head_dim]` and no weights."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (attention_mask is None or attention_mask.ndim != 4 or attention_mask.shape[1] != 1 or groups == 1
             or dropout or kwargs.get("position_bias") is not None or kwargs.get("output_attentions"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    n = query.shape[2]
    rows = attention_mask[..., : key.shape[-2]]
    if rows.shape[2] != groups * n:
        rows = grouped_rows(rows, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return _opaque_attention(query, key, value, rows, scale), None
    return step_attention.grouped_rows_attention(query, key, value, rows, scale), None


AttentionInterface.register(NAME, grouped_prefill_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, grouped_rows_mask)


def grouped_prefill(model: torch.nn.Module):
    """Within this block, a `model` that attends through transformers' "sdpa" uses
    `grouped_prefill_attention`; any other implementation is left as it is."""
    if model.config._attn_implementation != REPLACES:
        return contextlib.nullcontext()
    return step_attention.attending(model, NAME)
