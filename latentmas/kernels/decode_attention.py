"""Attention of one new token per row over a static key/value buffer (flash decoding).

The graph-replayed decode step keeps every layer's keys and values in buffers of `capacity`
slots, of which only the first `length` may hold anything; a bool mask says which of those a
row may attend (padding and kNN holes are False). SDPA reads every slot and, for a single
query row, parallelises poorly. Here the slots are split among programs instead:

1. `_split_kernel`, grid `(batch * kv_heads, splits)`: each program takes one GQA group (the
   `heads // kv_heads` query heads that read one kv head, as transformers' `repeat_kv`) as a
   `[GROUP_PAD, head_dim]` tile (GROUP_PAD >= 16 rows, the smallest `tl.dot` takes; the padding
   rows are zeros and never stored), walks its split's blocks of BLOCK_N slots up to `length`
   (read from device memory: no host sync, so it can be captured in a CUDA graph; programs
   whose split starts at or past `length` load nothing), and keeps a running max, sum and
   output in fp32. It writes its split's normalised output and log-sum-exp.
2. `_combine_kernel`, grid `(batch * heads,)`: weighs the splits' outputs by their
   log-sum-exps and writes the result in the query's dtype.

The split count depends on capacity and batch * kv_heads only (`split_plan`), never on
`length`, so one captured graph serves every length. Slots where the mask is False (or at or
past `length`) never contribute, whatever they hold (their keys and values are not even
loaded); a row with no slot to attend gets zeros.

`decode_attention` dispatches: the kernels on CUDA when triton imports, else
`decode_attention_reference` (pure torch, fp32). The kernels run through the custom op
`latentmas::decode_attention` so that `torch.compile(fullgraph=True)` treats the launch as
one opaque call (its fake implementation only gives the output's shape).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works
    triton = None

BLOCK_N = 64  # slots per block: a [64, 128] bf16 key tile is 16 KiB
PROGRAMS_PER_SM = 4  # split target: enough programs in flight to hide memory latency
DEFAULT_SM_COUNT = 132  # an H200's, for planning off a GPU (the interpreter, tests)
MAX_SPLITS = 64


def available() -> bool:
    """Whether the triton kernels can run here (triton imports and a CUDA device is present)."""
    return triton is not None and torch.cuda.is_available()


def _check(query, keys, values, mask, length) -> None:
    """One-line errors for inputs the kernels (and the reference) cannot take."""
    if query.dim() != 3:
        raise ValueError(f"query must be [batch, heads, head_dim], got shape {tuple(query.shape)}")
    batch, heads, dim = query.shape
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be [batch, kv_heads, capacity, head_dim], got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    _, kv_heads, capacity, _ = keys.shape
    if keys.shape[0] != batch or keys.shape[3] != dim:
        raise ValueError(f"keys {tuple(keys.shape)} do not match query {tuple(query.shape)} in batch or head_dim")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {kv_heads} kv heads")
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, capacity):
        raise ValueError(f"mask must be bool [batch, capacity] = [{batch}, {capacity}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if length.dtype != torch.int64 or length.numel() != 1:
        raise ValueError(f"length must be an int64 tensor of one element, got {length.dtype} {tuple(length.shape)}")
    if keys.dtype != query.dtype or values.dtype != query.dtype:
        raise ValueError(f"query, keys and values must share a dtype, got {query.dtype}, {keys.dtype}, {values.dtype}")
    devices = {t.device for t in (query, keys, values, mask, length)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def decode_attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                               length: torch.Tensor, scale: float) -> torch.Tensor:
    """What `decode_attention` computes, in plain torch (fp32 matmul and softmax).

    query `[batch, heads, head_dim]`; keys, values `[batch, kv_heads, capacity, head_dim]` (head h
    reads kv head h // (heads // kv_heads); the keys are not repeated: the query heads of a group
    become that group's query rows); mask bool `[batch, capacity]`, True where a slot may be
    attended; length int64 `[1]` on the inputs' device, slots at or past it are ignored (no host
    sync: it is compared on the device). Slots that are masked out or past `length` contribute
    nothing even when they hold NaN; a row with nothing to attend gets zeros.
    Returns `[batch, heads, head_dim]` in query's dtype.
    """
    _check(query, keys, values, mask, length)
    batch, heads, dim = query.shape
    _, kv_heads, capacity, _ = keys.shape
    allowed = mask & (torch.arange(capacity, device=mask.device) < length)  # [batch, capacity]
    rows = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(rows, keys.float().transpose(-1, -2)) * scale  # [batch, kv_heads, G, capacity]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    kept = values.float().masked_fill(~allowed[:, None, :, None], 0.0)
    out = torch.matmul(weights, kept)  # [batch, kv_heads, G, head_dim]
    out = torch.where(allowed.any(dim=1)[:, None, None, None], out, 0.0)
    return out.reshape(batch, heads, dim).to(query.dtype)


def split_plan(rows: int, capacity: int, block_n: int = BLOCK_N, sm_count: int = DEFAULT_SM_COUNT,
               wanted: int | None = None) -> tuple[int, int]:
    """(splits, slots per split) for `rows` = batch * kv_heads GQA groups over `capacity` slots.

    Aim for PROGRAMS_PER_SM * sm_count programs in all (an H200: 528): at batch size 1 with 8
    kv heads that asks for 66 splits, at 16 for 5, at 64 for 2, at 128 and above for 1. The
    splits are capped by the number of BLOCK_N blocks in the buffer (a split holds whole blocks)
    and by MAX_SPLITS, then evened out so that no split is empty of slots. Depends on capacity,
    never on how many slots are written. `wanted` (tests) replaces the target count.
    """
    blocks = max(1, math.ceil(capacity / block_n))
    if wanted is None:
        wanted = math.ceil(PROGRAMS_PER_SM * sm_count / max(rows, 1))
    splits = max(1, min(wanted, blocks, MAX_SPLITS))
    blocks_per_split = math.ceil(blocks / splits)
    return math.ceil(blocks / blocks_per_split), blocks_per_split * block_n


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _kernels():
    """The triton kernels, defined on first use: `triton.jit` reads TRITON_INTERPRET when it
    decorates, so a test can switch the interpreter on before the first launch whatever was
    imported before it."""

    @triton.jit
    def split_kernel(Q, K, V, Mask, Length, PartOut, PartLse, scale, capacity, split_size,
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     stride_mb, stride_mn, splits,
                     KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """PartOut fp32 `[batch, heads, splits, HEAD_DIM]` (contiguous), PartLse fp32 `[batch, heads, splits]`."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        b = (row // KV_HEADS).to(tl.int64)
        kv_head = (row % KV_HEADS).to(tl.int64)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g  # [GROUP_PAD]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        written = tl.minimum(tl.load(Length).to(tl.int32), capacity)
        start = split * split_size
        stop = tl.minimum(start + split_size, written)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        k_base = K + b * stride_kb + kv_head * stride_kh
        v_base = V + b * stride_vb + kv_head * stride_vh
        for block in range(start, stop, BLOCK_N):
            slots = block + tl.arange(0, BLOCK_N)
            in_range = slots < stop
            allowed = (tl.load(Mask + b * stride_mb + slots * stride_mn, mask=in_range, other=0) != 0) & in_range
            load_mask = allowed[:, None] & d_ok[None, :]
            k = tl.load(k_base + slots[:, None] * stride_kn + d[None, :], mask=load_mask, other=0.0)
            if UPCAST_DOT:  # triton 3.9's interpreter multiplies bf16 operands' raw bits
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s = s * scale  # [GROUP_PAD, BLOCK_N]
            s = tl.where(allowed[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing allowed
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slots[:, None] * stride_vn + d[None, :], mask=load_mask, other=0.0)
            if UPCAST_DOT:  # p rounded to v's dtype as on the GPU, then multiplied in fp32
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        part = (b * KV_HEADS * GROUP + heads) * splits + split  # [GROUP_PAD] index into [batch, heads, splits]
        tl.store(PartOut + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(PartLse + part, lse, mask=g_ok)

    @triton.jit
    def combine_kernel(PartOut, PartLse, Out, stride_ob, stride_oh, splits,
                       HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       SPLITS_PAD: tl.constexpr):
        """Out `[batch, heads, HEAD_DIM]` from the splits' outputs weighed by exp(lse - max lse)."""
        row = tl.program_id(0).to(tl.int64)
        b = row // HEADS
        h = row % HEADS
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < splits
        lse = tl.load(PartLse + row * splits + s, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse - top)  # [SPLITS_PAD]; 0 for empty splits and padding
        total = tl.sum(w, 0)
        parts = tl.load(PartOut + (row * splits + s)[:, None] * HEAD_DIM + d[None, :],
                        mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)

    return split_kernel, combine_kernel, type(split_kernel).__name__ == "InterpretedFunction"


def _decode_attention_triton(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             length: torch.Tensor, scale: float, block_n: int = BLOCK_N,
                             splits: int | None = None) -> torch.Tensor:
    """Launch the two kernels (shapes as `decode_attention_reference`; any strides with the last dim
    contiguous). `splits` (tests) overrides `split_plan`'s count; `block_n` a power of two >= 16."""
    if triton is None:
        raise RuntimeError("decode_attention's triton backend needs triton, which does not import here")
    _check(query, keys, values, mask, length)
    for name, tensor in (("query", query), ("keys", keys), ("values", values)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {tensor.stride()}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two of at least 16, got {block_n}")
    batch, heads, dim = query.shape
    _, kv_heads, capacity, _ = keys.shape
    group = heads // kv_heads
    rows = batch * kv_heads
    sm_count = DEFAULT_SM_COUNT
    if query.is_cuda:
        sm_count = _sm_count(torch.cuda.current_device() if query.device.index is None else query.device.index)
    splits, split_size = split_plan(rows, capacity, block_n, sm_count, splits)
    part_out = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, heads, dim, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    split_kernel, combine_kernel, interpreted = _kernels()
    block_d = max(16, triton.next_power_of_2(dim))
    precision = "ieee" if query.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs
    dtype_16 = query.dtype in (torch.bfloat16, torch.float16)
    mask_bytes = mask.view(torch.uint8)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        split_kernel[(rows, splits)](
            query, keys, values, mask_bytes, length, part_out, part_lse, float(scale), capacity, split_size,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), mask_bytes.stride(0), mask_bytes.stride(1), splits,
            KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
            BLOCK_D=block_d, BLOCK_N=block_n, PRECISION=precision, UPCAST_DOT=interpreted and dtype_16,
            num_warps=4)
        combine_kernel[(batch * heads,)](
            part_out, part_lse, out, out.stride(0), out.stride(1), splits,
            HEADS=heads, HEAD_DIM=dim, BLOCK_D=block_d, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
            num_warps=1 if dim <= 64 else 2)
    return out


@torch.library.custom_op("latentmas::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                         length: torch.Tensor, scale: float) -> torch.Tensor:
    """The triton kernels as one opaque op for torch.compile (any device triton can launch on)."""
    return _decode_attention_triton(query, keys, values, mask, length, scale)


@_decode_attention_op.register_fake
def _(query, keys, values, mask, length, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     length: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """Attention of one new token per row over the first `length` slots of a key/value buffer.

    query `[batch, heads, head_dim]`; keys, values `[batch, kv_heads, capacity, head_dim]` (any
    strides, head_dim contiguous; head h reads kv head h // (heads // kv_heads)); mask bool
    `[batch, capacity]`, True where a slot may be attended; length int64 `[1]` on the device:
    slots at or past it are never read. Returns `[batch, heads, head_dim]` in query's dtype
    (accumulated in fp32). backend: "auto" (triton on CUDA when it imports, else the reference),
    "triton" or "reference". Safe inside CUDA graph capture and `torch.compile(fullgraph=True)`.
    """
    if backend == "auto":
        backend = "triton" if query.is_cuda and triton is not None else "reference"
    if backend == "triton":
        return _decode_attention_op(query, keys, values, mask, length, scale)
    if backend == "reference":
        return decode_attention_reference(query, keys, values, mask, length, scale)
    raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
