"""A left-padded prompt prefilled on its real tokens only.

Agents' prompts in a batch differ in length, so `SharedCache.extend` gets them left-padded to the
longest, `[batch, n]`. Every projection, norm and MLP of the padded forward then runs on batch * n
tokens, the padding included: at batch size 64 on the bench's GSM8K problems each problem's four
prompts came to 845 padded tokens against their own 573 (`bench/floor.py`). Here the forward runs on
the N real tokens packed into one row, `[1, N, hidden]`, with each token's own RoPE position; only
attention needs the rows apart, and it gets them:

- the cache write (`kv_storage.BufferCache.packed`) scatters each layer's N new keys and values to
  their rows' slots of the n new columns, and zeroes the padding slots;
- the attention (`packed_attention`, registered with transformers under `NAME`) scatters the N
  queries into `[batch, heads, n, head_dim]`, attends as `prefill_attention` does (the query heads of
  a GQA group as that group's rows, on the unrepeated keys, with a mask made here once per forward)
  and gathers the N outputs back.

The cache ends up as the padded prefill leaves it, padding slots aside (zeros here; the padded
forward's keys of padding tokens there; nothing reads them: they are masked), and each row's last
column's hidden state is the same to float tolerance (`tests/test_packed_prefill.py`; other matrix
shapes, so not bit for bit).

`extend` packs where it helps and nothing stands in the way (`packable`): more than one row, some
padding, no hooks on the model (capture's prefill probes and kNN scoring read padded queries), a
model attending through transformers' "sdpa" attention interface, the grouped prefill attention on
(`shared_cache.GROUPED_PREFILL`) and, for logits, a plain head. The eager and the compiled
forward (`compiled_prefill`) both pack; in the compiled one the attention is one opaque op, as in
`prefill_attention`. Graphed chunks (`graph_prefill`, batches of up to 4 on CUDA) run before and stay
padded.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from . import prefill_attention, step_attention
from .compiled_prefill import compiled_layers, hooked, plain_head
from .prefill_attention import additive_rows

NAME = "latentmas_packed_prefill"
ROWS, COLUMNS = "latentmas_packed_rows", "latentmas_packed_columns"  # the keywords the index travels under
IMPLEMENTATIONS = (prefill_attention.REPLACES, prefill_attention.NAME)  # what a packed forward stands in for


def attended(cached: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """bool `[batch, 1, n, T + n]`, True where prompt token i may attend: the real cached columns
    (cached `[batch, T]`), and its prompt's real tokens up to itself (prompt `[batch, n]`). A padding
    token attends its own slot too, so that no row of the mask is empty, even on an empty cache (its
    output is never read)."""
    length, n = cached.shape[1], prompt.shape[1]
    causal = torch.ones(n, length + n, dtype=torch.bool, device=prompt.device).tril(diagonal=length)
    allowed = torch.cat([cached, prompt], dim=1)[:, None, None, :] & causal
    allowed[..., length:] |= torch.eye(n, dtype=torch.bool, device=prompt.device)
    return allowed


def packed_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows_mask: torch.Tensor,
                          rows: torch.Tensor, columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """query `[1, heads, N, head_dim]` of the packed tokens; key, value `[batch, kv_heads, T + n,
    head_dim]`; rows_mask `[batch, 1, groups * n, ≥ T + n]` (additive, `additive_rows`); rows, columns
    `[N]`: packed token k is token columns[k] of row rows[k]. Returns `[1, N, heads, head_dim]`."""
    batch, kv_heads, width, _ = key.shape
    _, heads, _, dim = query.shape
    n = rows_mask.shape[2] // (heads // kv_heads)
    padded = query.new_zeros(batch, heads, n, dim)
    padded.transpose(1, 2)[rows, columns] = query[0].transpose(0, 1)
    output = step_attention.grouped_rows_attention(padded, key, value, rows_mask[..., :width], scaling)
    return output[rows, columns][None]


@torch.library.custom_op("latentmas::packed_rows_attention", mutates_args=())
def _opaque_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows_mask: torch.Tensor,
                      rows: torch.Tensor, columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """`packed_rows_attention` as one op that torch.compile does not look into."""
    return packed_rows_attention(query, key, value, rows_mask, rows, columns, scaling).contiguous()


@_opaque_attention.register_fake
def _(query, key, value, rows_mask, rows, columns, scaling):
    _, heads, count, dim = query.shape
    return query.new_empty(1, count, heads, dim)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface for a packed forward: the index under the `ROWS` and `COLUMNS`
    keywords, the mask `forward` made as `attention_mask` (see `packed_rows_attention`)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attend = _opaque_attention if torch.compiler.is_compiling() else packed_rows_attention
    return attend(query, key, value, attention_mask, kwargs[ROWS], kwargs[COLUMNS], scale), None


AttentionInterface.register(NAME, packed_attention)


def packable(shared, mask: torch.Tensor, logits: bool) -> bool:
    """Whether `extend` can prefill this prompt (mask `[batch, n]`) packed (see the module's docstring):
    a model whose attention layers call transformers' attention interface with the forward's keywords
    (`_supports_attention_backend`), attending through "sdpa". Reads the mask on the host (a sync; the
    packed forward needs its real tokens' count there anyway)."""
    model = shared.lm.model
    batch, n = mask.shape
    return (batch > 1 and n > 1 and getattr(model, "_supports_attention_backend", False)
            and model.config._attn_implementation in IMPLEMENTATIONS
            and not (logits and plain_head(model) is None) and not hooked(model) and not bool(mask.all()))


@torch.no_grad()
def forward(shared, inputs_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, logits: bool,
            compiled: bool, cache_kwarg: str) -> torch.Tensor:
    """`extend`'s forward of a prompt (inputs_embeds `[batch, n, hidden]`, mask `[batch, n]`, positions
    `[batch, n]`) on its real tokens only, written to `shared`'s cache; the decoder layers compiled
    (`compiled_prefill`) when `compiled`. Returns each row's last token's final hidden state `[batch,
    hidden]`, or its next-token logits `[batch, vocab]`. The caller checks `packable` first."""
    model, decoder = shared.lm.model, shared.lm.model.base_model
    rows, columns = mask.nonzero(as_tuple=True)
    last = mask.sum(dim=1).cumsum(dim=0) - 1  # each row's last token in the packed row
    groups = shared.lm.num_heads // shared.lm.num_kv_heads
    kwargs = {
        "inputs_embeds": inputs_embeds[rows, columns][None],
        "attention_mask": additive_rows(attended(shared.mask, mask), groups, inputs_embeds.dtype),
        "position_ids": positions[rows, columns][None],
        cache_kwarg: shared.cache,
        "use_cache": True,
        ROWS: rows,
        COLUMNS: columns,
    }
    layers = compiled_layers(decoder) if compiled else contextlib.nullcontext()
    with shared.cache.packed(rows, columns, mask.shape[1]), step_attention.attending(model, NAME), layers:
        hidden = decoder(**kwargs).last_hidden_state[0, last]
    return plain_head(model)(hidden) if logits else hidden
