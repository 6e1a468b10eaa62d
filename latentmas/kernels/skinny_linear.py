"""`x @ weight.T` for a few rows of x: the decode step's projections, bound by reading the weights.

At one to a few tokens a projection reads its whole weight once and does almost no arithmetic,
so its time is the weight's bytes over the bandwidth the kernel reaches. Each program here owns
BLOCK_N output features and one of SPLIT_K slices of the input features; it streams its weight
tile [BLOCK_N, BLOCK_K] at a time and multiplies it by every row of x:

- one row (`BLOCK_M` = 1): elementwise products accumulated in fp32 and summed once at the end,
  no tensor cores (a `tl.dot` needs 16 rows);
- 2..`MAX_ROWS` rows: x padded to 16 rows for `tl.dot` (fp32 accumulation).

With SPLIT_K > 1 each slice writes an fp32 partial `[SPLIT_K, rows, N]` and a second kernel sums
the slices in order and rounds once: no atomics, so a result never depends on the order programs
ran in (run twice, the same bits). `plan(rows, N, K)` picks the tiles from the shape alone, so a
shape always runs the same program.

`skinny_linear(x, weight, bias)` is where a layer's projections go. In a compiled batch-1 step on CUDA
it first takes `kernels.split_k` (o_proj and down_proj as split-K partials, on by default, whatever
the switch below says); otherwise it runs the kernels here through the custom op
`latentmas::skinny_linear` (opaque to torch.compile) when LATENTMAS_SKINNY_LINEAR=1, on CUDA, for
bf16/fp16 inputs of at most MAX_ROWS rows, and `F.linear` else. The kernels are off by default: on an
H200 (`bench/gemm_probe.py --skinny`, Qwen3-4B shapes, 36 weights per CUDA graph, 2026-12-03) the
best tiles of a sweep took 0.87x cuBLAS's time for o_proj, 0.94x for down_proj, 0.97x for the fused
gate/up and 1.07x for the fused q/k/v at one row, 0.92-0.97x at 4 and 16 rows (q/k/v 1.05x at 16):
a few per cent of a step at best, and no end-to-end run has shown that gain yet. `plan` picks tiles
close to those. The switch is read when a step is built or compiled, so benches time both in separate processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .split_k import split_for, split_k_linear

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_ROWS = 16  # rows of x (tokens) up to which the kernels run; above, F.linear


class Plan(NamedTuple):
    """Tiles of one launch: output features per program, input features per step of its loop, the
    number of input-feature slices, warps per program and software-pipeline stages."""

    block_n: int
    block_k: int
    split_k: int
    warps: int = 4
    stages: int = 3


def plan(rows: int, out_features: int, in_features: int) -> Plan:
    """The launch for `[rows, in_features] @ [out_features, in_features].T`, from the shape alone: tiles
    close to the sweep's best (module docstring). Few outputs (at most 4096: o_proj, down_proj) split the
    input features so that enough programs run; many (gate/up, q/k/v) take them whole."""
    few = out_features <= 4096
    if rows == 1:
        return Plan(16, 256 if in_features >= 4096 else 128, 4 if few else 1, warps=8 if few else 4,
                    stages=3 if few else 4)
    return Plan(32, 128, (8 if in_features <= 4096 else 4) if few else 1, stages=3)


@functools.cache
def _kernels():
    """The triton kernels, defined on first use (so TRITON_INTERPRET set by a test takes effect)."""

    @triton.jit
    def matmul_kernel(X, W, Out, Part, M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
        """Out `[M, N]`, or with PARTIAL the slices' fp32 sums Part `[slices, M, N]`; W `[N, K]`, X `[M, K]`."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        k_start = pid_k * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        w_rows = W + n.to(tl.int64)[:, None] * stride_wn
        if BLOCK_M == 1:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(k_start, k_stop, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < k_stop
                x = tl.load(X + k, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
                acc2 += w.to(tl.float32) * x[None, :]
            acc = tl.sum(acc2, 1)[None, :]  # [1, BLOCK_N]
        else:
            m = tl.arange(0, BLOCK_M)
            m_ok = m < M
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(k_start, k_stop, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < k_stop
                x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
                if UPCAST_DOT:  # the interpreter multiplies bf16 operands' raw bits
                    acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
        rows = tl.arange(0, BLOCK_M)
        keep = (rows < M)[:, None] & n_ok[None, :]
        if not PARTIAL:
            tl.store(Out + rows[:, None] * stride_om + n[None, :], acc.to(Out.dtype.element_ty), mask=keep)
        else:
            tl.store(Part + (pid_k * M + rows[:, None]) * N + n[None, :], acc, mask=keep)

    @triton.jit
    def sum_kernel(Part, Bias, Out, M, N, stride_om, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
        """Out `[M, N]` = sum over the slices of Part fp32 `[SPLIT_K, M, N]` (+ bias), slice 0 first."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < M * N
        total = tl.load(Part + i, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            total += tl.load(Part + s * M * N + i, mask=ok, other=0.0)
        if HAS_BIAS:
            total += tl.load(Bias + i % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + (i // N) * stride_om + i % N, total.to(Out.dtype.element_ty), mask=ok)

    return matmul_kernel, sum_kernel, type(matmul_kernel).__name__ == "InterpretedFunction"


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_linear takes x [rows, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {x.shape[0]}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x and weight must be contiguous in K, got strides {x.stride()} and {weight.stride()}")
    if x.dtype != weight.dtype or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"x, weight (and bias [N]) must match: {x.dtype} / {weight.dtype}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")


def _skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          tiles: Plan | None = None) -> torch.Tensor:
    """Launch the kernels: x `[rows, K]`, weight `[N, K]`, bias `[N]` or None -> `[rows, N]` in x's dtype.
    `tiles` (benches, tests) replaces `plan`'s choice."""
    if triton is None:
        raise RuntimeError("skinny_linear's triton backend needs triton, which does not import here")
    _check(x, weight, bias)
    rows, in_features = x.shape
    out_features = weight.shape[0]
    tiles = tiles or plan(rows, out_features, in_features)
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    matmul_kernel, sum_kernel, interpreted = _kernels()
    split = tiles.split_k
    k_per_split = triton.cdiv(triton.cdiv(in_features, split), tiles.block_k) * tiles.block_k
    split = triton.cdiv(in_features, k_per_split)  # no empty slice
    summed = split > 1 or bias is not None
    part = torch.empty(split, rows, out_features, dtype=torch.float32, device=x.device) if summed else out
    block_m = 1 if rows == 1 else 16
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        matmul_kernel[(triton.cdiv(out_features, tiles.block_n), split)](
            x, weight, out, part, rows, out_features, in_features, k_per_split,
            x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PARTIAL=summed,
            UPCAST_DOT=interpreted, num_warps=tiles.warps, num_stages=tiles.stages)
        if summed:
            block = 1024
            sum_kernel[(triton.cdiv(rows * out_features, block),)](
                part, bias if bias is not None else part, out, rows, out_features, out.stride(0),
                SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


@torch.library.custom_op("latentmas::skinny_linear", mutates_args=())
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _skinny_linear_triton(x, weight, bias)


@_skinny_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_linear` runs the kernels for these inputs (else it calls F.linear)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (os.environ.get("LATENTMAS_SKINNY_LINEAR", "0") == "1" and triton is not None and x.is_cuda
            and 0 < rows <= MAX_ROWS and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(-1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x `[..., K]`, weight `[N, K]` -> `[..., N]`: as split-K partials
    summed by the next fused kernel in a compiled batch-1 step (`split_k.split_for`), through the
    kernels here when `usable` (CUDA, bf16/fp16, at most MAX_ROWS rows), else through F.linear."""
    splits = split_for(x, weight)
    if splits:
        return split_k_linear(x, weight, bias, splits)
    if not usable(x, weight):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return _skinny_linear_op(flat, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
