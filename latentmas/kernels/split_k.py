"""A one-row projection as split-K partial sums that the next fused kernel adds up.

At one token per row cuBLAS runs a projection with few output features (o_proj 2560 x 4096 and
down_proj 2560 x 9728 in Qwen3-4B) as split-K: one kernel writes fp32 partial sums over slices of
the input features, and a second (`splitKreduce_kernel`) adds them and rounds, 1.7 us a call twice a
layer on an H200, with a launch gap between the two (stop 24's batch-1 profile). Here the product is
one batched product over `splits` slices of the input features with fp32 outputs (cuBLAS through
`torch.bmm(..., out_dtype=torch.float32)`), `[splits, rows, N]`, and the sum is left to torch: under
torch.compile inductor unrolls a sum over at most 8 slices (`unroll_reductions_threshold`) into the
kernel that reads the projection anyway (the residual add and RMSNorm after o_proj and down_proj,
SiLU-mul after gate/up, the norms, RoPE and cache write after q/k/v), so the reduction has no kernel
of its own. The product is summed in another order than cuBLAS's, in fp32; eagerly `split_k_linear`
rounds it to x's dtype as F.linear does, but inside a fused kernel inductor keeps it in fp32 through
the residual add (it does not round intermediates), so a compiled step rounds once where it rounded
twice: more exact, not the same bits.

On an H200 (Qwen3-4B shapes, stop 25, `bench/decode_probe.py --split_k off,4:1,4:2,off,4:1`): the
compiled, graph-replayed batch-1 step with sampling took 3.266 ms with o_proj and down_proj in 4
slices against 3.463 ms without (twice each, side by side in one process); q/k/v and gate/up in 2
slices as well took 3.297 ms, so those stay whole (`SPLITS["many"]` 1). Alone (`bench/gemm_probe.py
--split_k 2,4,8`, 36 weights per CUDA graph) down_proj's partials took 14.8 us against F.linear's 17.4
with its reduction.

`split_for(x, weight)` says how many slices to take: 0 (use F.linear) unless the step is being
compiled (eagerly the sum would be a kernel of its own again), on CUDA (`DEVICES`), in bf16/fp16, with a row
count fixed at 1 (the batch-1 step compiles apart from larger ones), and `SPLITS` names a count for
the weight's number of output features. `SPLITS` is read while the step is traced, so dynamo
recompiles when a bench changes it.
"""

from __future__ import annotations

import torch

# how many slices of the input features, by the projection's output features: few (<= 4096, o_proj and
# down_proj, which cuBLAS splits itself) or many (q/k/v and gate/up fused); 1 or 0 = F.linear
SPLITS = {"few": 4, "many": 1}
MAX_SPLITS = 8  # inductor unrolls sums over at most 8 (torch._inductor.config.unroll_reductions_threshold)
DEVICES = ("cuda",)  # where compiled steps take it (CPU tests add "cpu")


@torch.library.custom_op("latentmas::split_k_partials", mutates_args=())
def split_k_partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """fp32 partial products over `splits` equal slices of the input features: x `[rows, K]`, weight
    `[N, K]` -> `[splits, rows, N]`, whose sum over the first dim is `x @ weight.T`. Opaque to
    torch.compile, so cuBLAS's choice of kernel does not depend on inductor's tuning."""
    rows, in_features = x.shape
    chunk = in_features // splits
    slices = x.view(rows, splits, chunk).transpose(0, 1)  # [splits, rows, chunk]
    weights = weight.view(weight.shape[0], splits, chunk).permute(1, 2, 0)  # [splits, chunk, N], no copy
    if x.is_cuda:
        return torch.bmm(slices, weights, out_dtype=torch.float32)
    return torch.bmm(slices.float(), weights.float())  # no bmm(out_dtype) on the CPU: the same fp32 sums


@split_k_partials.register_fake
def _(x, weight, splits):
    return x.new_empty(splits, x.shape[0], weight.shape[0], dtype=torch.float32)


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x `[..., K]`, weight `[N, K]` -> `[..., N]` in x's dtype: the
    partials of `split_k_partials` summed in fp32 (with the bias) and rounded once."""
    flat = x.reshape(-1, x.shape[-1])
    total = split_k_partials(flat, weight, splits).sum(0)
    if bias is not None:
        total = total + bias.float()
    return total.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def split_for(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many slices `split_k_linear` should take for x `[..., K]` @ weight `[N, K]`.T, 0 for F.linear:
    only while torch.compile traces, on `DEVICES`, for one row of a static shape, x and a contiguous
    weight of one 16-bit dtype (module docstring)."""
    if not (torch.compiler.is_compiling() and x.device.type in DEVICES):
        return 0
    rows = x.shape[:-1].numel()
    if not (isinstance(rows, int) and rows == 1 and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(-1) == 1
            and weight.stride(0) == weight.shape[1]):
        return 0
    return fitting_splits(weight.shape[1], SPLITS["few" if weight.shape[0] <= 4096 else "many"])


def fitting_splits(in_features: int, splits: int) -> int:
    """`splits` if it cuts `in_features` into equal slices of whole 16-byte rows (8 bf16 values, which
    cuBLAS's batched product wants) and is 2..MAX_SPLITS, else 0."""
    if splits < 2 or splits > MAX_SPLITS or in_features % splits or (in_features // splits) % 8:
        return 0
    return splits
