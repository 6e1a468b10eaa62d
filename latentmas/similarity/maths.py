"""The tensor maths behind the similarity modes (torch, on the device, no host synchronisation).

All results are float32 over the T cache columns that exist at a hand-off:

- `layer_similarities`: the seed's cosine between the incoming agent's mean prompt input
  embedding (cut into head-sized chunks and averaged) and head-averaged keys, `[batch, L, T]`.
- `query_similarities` (= `mean_unit_query` then `key_similarities`): the cosine between the
  incoming agent's real attention queries and the cached keys of each query head's own GQA
  group, averaged over real prompt tokens and heads, one layer, `[batch, T]` in [-1, 1].
- `attention_received`: the attention probability each cached column receives from the
  incoming agent's real prompt tokens, as the model computes it, one layer, `[batch, T]` in [0, 1].

`fused` runs a function through torch.compile on CUDA. The modes that use these live in
`seed.py`, `query.py` and `attention.py`; `latentmas.prefill` collects a prefill's queries.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

# Largest score block (elements) `attention_received` materialises at once; bigger layers are
# chunked over kv-head groups so the fp32 scores stay a few hundred MiB at most.
ATTENTION_CHUNK_ELEMENTS = 1 << 26
# Largest group of layers' fp32 head means `layer_similarities` holds at once (32 MiB; with
# F.cosine_similarity's temporaries about four times that).
SEED_GROUP_ELEMENTS = 1 << 23
_EPS = 1e-12  # as F.normalize: a zero vector has cosine 0 with everything
_BMM_OUT_DTYPE = TorchVersion(torch.__version__) >= (2, 8)  # torch.bmm(..., out_dtype=) exists


# Device types on which `fused` functions run through torch.compile, so that their elementwise
# work and reductions become a few fused kernels instead of one pass over memory per op.
FUSED_DEVICE_TYPES = ("cuda",)


def fused(fn: Callable) -> Callable:
    """`fn` compiled with `torch.compile(dynamic=True)` when its first argument is a tensor on one of
    `FUSED_DEVICE_TYPES`, eager otherwise.

    It compiles on the first such call and again for a few new shape patterns (a batch of one,
    other strides, another dtype), seconds each, then reuses the graphs. If the compiler fails
    (no Triton, no C compiler), a one-line warning gives the reason and `fn` runs eager from then
    on; errors that are not the compiler's (bad input, out of memory) propagate as they are.
    `run.compiled_calls` counts the calls that ran compiled.
    """
    compiled: Callable | None = None
    failed = False

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled, failed
        if failed or args[0].device.type not in FUSED_DEVICE_TYPES:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            result = compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            failed = True
            cause = error.inner_exception
            reason = (str(cause).strip().splitlines() or [""])[0]
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(cause).__name__}: {reason}); running it "
                          "eager", stacklevel=2)
            return fn(*args)
        run.compiled_calls += 1
        return result

    run.compiled_calls = 0
    return run


def reduce_query(query: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, hidden] -> [batch, head_dim]: cut into head-sized chunks and average them.

    When hidden == kv_heads * head_dim the chunks are exactly the kv heads.
    """
    batch, hidden = query.shape
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of head_dim {head_dim}: cannot reduce the query")
    return query.reshape(batch, hidden // head_dim, head_dim).mean(dim=1, dtype=torch.float32)


def layer_similarities(keys: Sequence[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the query and every cached key, at every layer.

    keys: one tensor per layer, `[batch, kv_heads, T, head_dim]` (a cache's keys).
    query: `[batch, hidden]`, the incoming agent's mean prompt input embedding.
    Returns float32 `[batch, num_layers, T]` in [-1, 1], computed on the keys'
    device in fp32 with no host synchronisation.

    Keys are averaged over heads, the query reduced to head_dim (`reduce_query`). The head means of a
    group of layers (at most SEED_GROUP_ELEMENTS fp32 values, `[G, batch, T, head_dim]`; F.cosine_similarity
    makes about three more of that size) are written into one buffer and their cosines taken in one
    call. Op by op, one layer at a time, Qwen3-4B's 36 layers made about 320 small kernels and 4 ms of
    wall time per hand-off at batch size 1 on an H200 (`bench/phase_profile.py --capture`, the device
    synced around the call), while all layers' means at once (`[B, L, T, D]`, 1.3 GB at 64 problems x
    1,131 columns) were most of the capture's extra GPU memory (bench/similarity_memory.py).
    """
    if not keys:
        raise ValueError("layer_similarities needs at least one layer of keys")
    batch, _, columns, head_dim = keys[0].shape
    if any(k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (batch, columns, head_dim) for k in keys):
        raise ValueError("layer_similarities needs every layer's keys as [batch, kv_heads, T, head_dim] with one "
                         f"batch, T and head_dim, got {[tuple(k.shape) for k in keys]}")
    q = reduce_query(query.to(keys[0].device), head_dim)[:, None, :]  # [B, 1, D]
    per_group = max(1, SEED_GROUP_ELEMENTS // max(1, batch * columns * head_dim))
    out = torch.empty(batch, len(keys), columns, dtype=torch.float32, device=keys[0].device)
    for start in range(0, len(keys), per_group):
        group = keys[start:start + per_group]
        means = torch.empty(len(group), batch, columns, head_dim, dtype=torch.float32, device=keys[0].device)
        for mean, k in zip(means, group):
            torch.mean(k, dim=1, dtype=torch.float32, out=mean)
        out[:, start:start + len(group)] = F.cosine_similarity(means, q, dim=-1).transpose(0, 1)  # [B, G, T]
    return out


def _check_shapes(queries: torch.Tensor, keys: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[int, int, int]:
    """-> (batch, kv_heads, heads per kv head)."""
    if queries.ndim != 4 or keys.ndim != 4:
        raise ValueError(f"queries and keys must be [batch, heads, tokens, head_dim], got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    batch, heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if keys.shape[0] != batch or keys.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}")
    if tuple(prompt_mask.shape) != (batch, n):
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} does not fit queries {tuple(queries.shape)}")
    return batch, kv_heads, heads // kv_heads


def _token_weights(prompt_mask: torch.Tensor) -> torch.Tensor:
    """[batch, n] bool -> [batch, n] fp32: 1 / (real tokens) on real tokens, 0 on padding."""
    real = prompt_mask.to(torch.float32)
    return real / real.sum(dim=1, keepdim=True).clamp_min(1.0)


def query_similarities(queries: torch.Tensor, keys: torch.Tensor, prompt_mask: torch.Tensor,
                       kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine between the prompt's attention queries and each cached key, for one layer.

    queries: `[batch, heads, n, head_dim]`, the incoming prompt's queries after q_proj, q_norm
             and RoPE (what the attention kernel receives).
    keys: `[batch, kv_heads, T, head_dim]`, the cached keys (after k_norm and RoPE).
    prompt_mask: `[batch, n]` bool, False for the prompt's padding (left padding).
    kv_mask: `[batch, T]` bool, False for padding columns, which are set to 0.
    Returns float32 `[batch, T]` in [-1, 1]: cos(q[b, h, i], k[b, h // group, t]) averaged
    over real prompt tokens i and all heads h (query head h reads kv head h // (heads // kv_heads)).

    A mean of cosines is the dot product of the mean unit query with each unit key, so the work
    is O(heads·n·D + kv_heads·T·D), never `[heads, n, T]`: `mean_unit_query`, then
    `key_similarities`. Several layers can go at once by stacking them along the batch axis.
    """
    _check_shapes(queries, keys, prompt_mask)
    return key_similarities(mean_unit_query(queries, prompt_mask), keys, kv_mask)


def mean_unit_query(queries: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """`[batch, heads, n, head_dim]` queries, `[batch, n]` bool mask -> fp32 `[batch, heads, head_dim]`:
    each head's unit query averaged over the real prompt tokens.

    Read in the queries' own dtype, fp32 products; norms via `vector_norm(dtype=float32)`, no
    normalised copy.
    """
    weights = _token_weights(prompt_mask).to(queries.device)  # [B, n]
    norms = torch.linalg.vector_norm(queries, dim=-1, dtype=torch.float32).clamp_min(_EPS)  # [B, H, n]
    return (queries * (weights[:, None, :] / norms)[..., None]).sum(dim=2)


def key_similarities(mean_queries: torch.Tensor, keys: torch.Tensor,
                     kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dot product of each head's mean unit query with each unit key of its GQA group, averaged over heads.

    mean_queries: fp32 `[batch, heads, head_dim]` (`mean_unit_query`).
    keys: `[batch, kv_heads, T, head_dim]`; heads // kv_heads query heads share each kv head.
    kv_mask: `[batch, T]` bool, False for padding columns, which are set to 0.
    Returns float32 `[batch, T]`. Keys are read in their own dtype (`_dots`).
    """
    batch, heads, head_dim = mean_queries.shape
    kv_heads, T = keys.shape[1:3]
    mean_q = mean_queries.view(batch, kv_heads, heads // kv_heads, head_dim).mean(dim=2)  # [B, KV, D]
    k_norms = torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32).clamp_min(_EPS)  # [B, KV, T]
    dots = _dots(keys.reshape(batch * kv_heads, T, head_dim), mean_q.reshape(batch * kv_heads, head_dim))
    sims = (dots.view(batch, kv_heads, T) / k_norms).mean(dim=1)  # [B, T], mean over kv heads
    if kv_mask is not None:
        sims = sims.masked_fill(~kv_mask.to(device=sims.device, dtype=torch.bool), 0.0)
    return sims


def _dots(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """`rows` `[N, T, D]` (any float dtype) · `vectors` `[N, D]` fp32 -> fp32 `[N, T]`, reading `rows` once.

    Half-precision rows on CUDA: each vector is split into its half-precision value and the
    remainder, both multiplied by one fp32-accumulating product (`fp32_bmm`) and added: about
    fp32 precision without an fp32 copy of `rows`. Under torch.compile, a plain fp32 product and
    sum, which the compiler fuses (no copy either).
    """
    if torch.compiler.is_compiling():  # fused with the caller's key norms: one fp32 pass over `rows`
        return (rows.float() * vectors[:, None, :]).sum(dim=-1)
    if rows.dtype == torch.float32 or not rows.is_cuda:
        return torch.bmm(rows.float(), vectors[..., None]).squeeze(-1)
    high = vectors.to(rows.dtype)
    low = (vectors - high.float()).to(rows.dtype)
    return fp32_bmm(rows, torch.stack([high, low], dim=-1)).sum(dim=-1)


def fp32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(a, b)` with an fp32 result. Half-precision inputs on CUDA stay on the tensor cores
    (`out_dtype`, torch >= 2.8: fp32 accumulation, as attention kernels compute scores); elsewhere,
    fp32 inputs."""
    if a.dtype != torch.float32 and a.is_cuda and _BMM_OUT_DTYPE:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def attention_bias(prompt_mask: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
    """The additive mask of a prompt prefill: `[batch, n]`, `[batch, T]` bool -> fp32 `[batch, 1, 1, n, T + n]`.

    0 where a prompt token attends (real cache columns, real prompt columns up to itself), -inf
    elsewhere. Padding tokens (which `attention_received` weights 0) may attend to everything,
    so no softmax row is empty (NaN).
    """
    batch, n = prompt_mask.shape
    T = kv_mask.shape[1]
    device = prompt_mask.device
    prompt_mask = prompt_mask.to(torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([kv_mask.to(device=device, dtype=torch.bool)[:, None, :].expand(batch, n, T),
                         causal[None] & prompt_mask[:, None, :]], dim=2) | ~prompt_mask[:, :, None]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))
    return bias[:, None, None]


def attention_received(queries: torch.Tensor, keys: torch.Tensor, prompt_mask: torch.Tensor,
                       kv_mask: torch.Tensor, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probability each cached column receives from the prompt, for one layer.

    queries: `[batch, heads, n, head_dim]`, the prompt's queries (after q_norm and RoPE).
    keys: `[batch, kv_heads, T + n, head_dim]`, every key the prompt attends to: the T cached
          columns, then the prompt's own n columns (the layer's cache right after the prefill).
    prompt_mask: `[batch, n]` bool, False for the prompt's (left) padding.
    kv_mask: `[batch, T]` bool, False for the cache's padding columns (they get no attention).
    scaling: the attention module's `scaling` (usually head_dim ** -0.5).
    bias: `attention_bias(prompt_mask, kv_mask)`, when the caller already has it.
    Returns float32 `[batch, T]` in [0, 1]: softmax(q·k·scaling) over the real cache columns and
    the causal real prompt part, restricted to the cache columns, averaged over heads and real
    prompt tokens. Each row sums to at most 1; the rest is attention to the prompt itself.

    Scores are fp32 `[batch, heads, n, T + n]` (`fp32_bmm`: half inputs, fp32 products), built
    a group of kv heads at a time when they would exceed `ATTENTION_CHUNK_ELEMENTS`; the softmax
    rows are weighted and summed by one batched product over the cache's full width. Several
    layers can go at once by stacking them along the batch axis. No host synchronisation.
    """
    batch, kv_heads, group = _check_shapes(queries, keys, prompt_mask)
    n, width = queries.shape[2], keys.shape[2]
    T = width - n
    if T < 0 or tuple(kv_mask.shape) != (batch, T):
        raise ValueError(f"kv_mask {tuple(kv_mask.shape)} does not fit keys {tuple(keys.shape)} minus the "
                         f"{n} prompt columns")
    prompt_mask = prompt_mask.to(device=queries.device, dtype=torch.bool)
    if bias is None:
        bias = attention_bias(prompt_mask, kv_mask.to(queries.device))  # [B, 1, 1, n, T + n]
    weights = _token_weights(prompt_mask)  # [B, n]
    head_dim = queries.shape[-1]
    q = queries.reshape(batch, kv_heads, group * n, head_dim)  # each kv head's query rows (its heads' tokens)

    per_kv_head = batch * group * n * width
    step = max(1, min(kv_heads, ATTENTION_CHUNK_ELEMENTS // max(per_kv_head, 1)))
    received = None
    for start in range(0, kv_heads, step):
        k = min(kv_heads, start + step) - start
        scores = fp32_bmm(q[:, start:start + k].reshape(batch * k, group * n, head_dim),
                          keys[:, start:start + k].reshape(batch * k, width, head_dim).transpose(1, 2))
        scores = torch.add(bias, scores.view(batch, k, group, n, width), alpha=scaling)  # [B, k, G, n, T + n]
        probs = torch.softmax(scores, dim=-1).view(batch, k * group * n, width)
        del scores
        row_weights = weights[:, None, :].expand(batch, k * group, n).reshape(batch, 1, k * group * n)
        part = torch.bmm(row_weights, probs)[:, 0, :T]  # [B, T]: over real tokens and the chunk's heads
        received = part if received is None else received + part
    return received / (kv_heads * group)
