"""`query`: cosine between the incoming prompt's real attention queries and its GQA group's keys."""

from __future__ import annotations

from .base import PrefillMode
from .maths import fused, key_similarities, mean_unit_query


class QuerySimilarity(PrefillMode):
    name = "query"
    description = ("cosine between the incoming prompt's real attention queries at each layer and the cached "
                   "keys of their GQA group")
    label = "cosine similarity"
    value_range = (-1.0, 1.0)
    default_cmap = "RdYlGn"

    def score(self, layers):
        return rotated_query_similarities(layers.queries, layers.cos, layers.sin, layers.prompt_mask, layers.keys,
                                          layers.kv_mask, layers.rope)


def rotated(queries, cos, sin, rope):
    """Pre-RoPE queries `[batch, n, heads, head_dim]` -> `[batch, heads, n, head_dim]` after the model's own
    `rope(q, k, cos, sin)` (cos, sin `[batch, n, head_dim]`); its key output (one head) is unused."""
    queries = queries.transpose(1, 2)
    return rope(queries, queries[:, :1], cos, sin)[0]


@fused
def rotated_query_similarities(queries, cos, sin, prompt_mask, keys, kv_mask, rope):
    """`query_similarities` of pre-RoPE queries `[batch, n, heads, head_dim]` (`rotated` here) with the
    first T = kv_mask.shape[1] columns of the layer's keys `[batch, kv_heads, T + n, head_dim]` (the
    cache right after the prefill) -> fp32 `[batch, T]`. On CUDA one compiled function (`fused`):
    the compiler fuses RoPE, norms and products into a few kernels."""
    cached = keys[:, :, :kv_mask.shape[1]]
    return key_similarities(mean_unit_query(rotated(queries, cos, sin, rope), prompt_mask), cached, kv_mask)
