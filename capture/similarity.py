"""How an incoming agent's query relates to each cached token, per layer (torch, on the device)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

MODES = ("seed",)


def reduce_query(query: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, hidden] -> [batch, head_dim]: cut into head-sized chunks and average them.

    When hidden == kv_heads * head_dim the chunks are exactly the kv heads.
    """
    batch, hidden = query.shape
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of head_dim {head_dim}: cannot reduce the query")
    return query.reshape(batch, hidden // head_dim, head_dim).mean(dim=1, dtype=torch.float32)


def layer_similarities(keys: Sequence[torch.Tensor], query: torch.Tensor, mode: str = "seed") -> torch.Tensor:
    """Cosine similarity between the query and every cached key, at every layer.

    keys: one tensor per layer, `[batch, kv_heads, T, head_dim]` (a cache's keys).
    query: `[batch, hidden]`, the incoming agent's mean prompt input embedding.
    Returns float32 `[batch, num_layers, T]` in [-1, 1], computed on the keys'
    device in fp32 with no host synchronisation.

    mode "seed": keys averaged over heads, query reduced to head_dim (`reduce_query`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown similarity mode {mode!r}; choose from {', '.join(MODES)}")
    if not keys:
        raise ValueError("layer_similarities needs at least one layer of keys")
    head_dim = keys[0].shape[-1]
    head_mean_keys = torch.stack([k.mean(dim=1, dtype=torch.float32) for k in keys], dim=1)  # [B, L, T, D]
    q = reduce_query(query.to(head_mean_keys.device), head_dim)  # [B, D]
    return F.cosine_similarity(head_mean_keys, q[:, None, None, :], dim=-1)
