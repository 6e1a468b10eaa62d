"""Plain references for the similarity maths on random tensors: loops in float64, one row, head and token
at a time (`test_similarity_modes`, and `test_cuda` on a GPU; no import of the CLI, so a bare GPU
environment runs them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_query(queries, keys, prompt_mask):
    """Mean over real tokens and heads of cos(q[b, h, i], k[b, h // group, t]), one by one."""
    batch, heads, _, _ = queries.shape
    group = heads // keys.shape[1]
    out = torch.zeros(batch, keys.shape[2])
    for b in range(batch):
        real = prompt_mask[b].nonzero().squeeze(1).tolist()
        for h in range(heads):
            k = keys[b, h // group].double()  # [T, D]
            for i in real:
                out[b] += F.cosine_similarity(k, queries[b, h, i].double()[None], dim=-1, eps=1e-12).float()
        out[b] /= heads * len(real)
    return out


def naive_attention(queries, keys, prompt_mask, kv_mask, scaling):
    """Softmax row by row over the allowed keys, restricted to the cache, averaged over heads and tokens."""
    batch, heads, n, _ = queries.shape
    T = keys.shape[2] - n
    group = heads // keys.shape[1]
    out = torch.zeros(batch, T, dtype=torch.float64)
    for b in range(batch):
        real = prompt_mask[b].nonzero().squeeze(1).tolist()
        for h in range(heads):
            for i in real:
                allowed = torch.cat([kv_mask[b], prompt_mask[b] & (torch.arange(n) <= i)])
                logits = keys[b, h // group].double() @ queries[b, h, i].double() * scaling
                weights = torch.zeros(T + n, dtype=torch.float64)
                weights[allowed] = torch.softmax(logits[allowed], dim=0)
                out[b] += weights[:T]
        out[b] /= heads * len(real)
    return out.float()


def random_case(batch=3, heads=4, kv_heads=2, n=5, T=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, heads, n, D, generator=g)
    keys = torch.randn(batch, kv_heads, T + n, D, generator=g) + 0.3 * torch.randn(D, generator=g)
    prompt_mask = torch.ones(batch, n, dtype=torch.bool)
    kv_mask = torch.ones(batch, T, dtype=torch.bool)
    for b in range(batch):  # left padding, different per row (row 0 none)
        prompt_mask[b, :b] = False
        kv_mask[b, :2 * b] = False
    return queries, keys, prompt_mask, kv_mask
