"""decode_attention: the split-KV triton kernels and the torch reference against SDPA on repeated keys.

Without CUDA the kernels run in triton's interpreter on CPU tensors, in a child pytest
(`test_kernels_in_the_triton_interpreter`, see tests/triton_interpreter.py); on CUDA they run here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import DEVICE, interpreter_child_test, kernels_fixture

from latentmas.kernels import decode_attention, decode_attention_reference
from latentmas.kernels.decode_attention import _decode_attention_triton, split_plan

# the package's `decode_attention` is the function; the module of the same name is this
module = importlib.import_module("latentmas.kernels.decode_attention")

# bf16 outputs are rounded to bf16 (half an ulp is 2**-9 relative) and the kernel rounds the softmax
# weights to bf16 before multiplying by the values, as flash attention does.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


kernels = kernels_fixture(module)
test_kernels_in_the_triton_interpreter = interpreter_child_test(__file__, module)


@dataclass(frozen=True)
class Case:
    batch: int
    group: int  # query heads per kv head
    dim: int
    dtype: torch.dtype
    splits: int | None  # None: split_plan's choice
    capacity: int = 45  # not a multiple of block_n
    length: int = 37
    kv_heads: int = 2
    block_n: int = 16

    def __str__(self):
        dtype = str(self.dtype).removeprefix("torch.")
        return f"b{self.batch}-g{self.group}-d{self.dim}-{dtype}-s{self.splits}-c{self.capacity}-l{self.length}"


CASES = [
    Case(1, 1, 64, torch.float32, 1),
    Case(3, 2, 64, torch.float32, None),
    Case(3, 4, 128, torch.float32, 2),
    Case(1, 4, 64, torch.bfloat16, None),
    Case(3, 1, 128, torch.bfloat16, 1),
    Case(3, 2, 128, torch.bfloat16, None),
    # many splits (13 of one block), the last several starting past length: they must stay empty
    Case(1, 2, 64, torch.float32, None, capacity=200, length=100),
    Case(3, 4, 64, torch.bfloat16, None, capacity=200, length=150),
    Case(1, 4, 128, torch.bfloat16, 1, capacity=200, length=200, kv_heads=1, block_n=64),
]


def _inputs(case: Case, seed: int = 0):
    """(query, keys, values, mask, length, clean keys, clean values, allowed).

    Slots at or past length hold NaN and some of them are still True in `mask` (stale bits: the
    contract says False there, but neither backend may rely on it); masked-out slots inside the
    written part (kNN-like holes, left padding of 0, 5, 11 slots) hold NaN too.
    `allowed` `[batch, capacity]` is what may really be attended; the clean keys and values hold
    zeros wherever it is False (for SDPA, which NaN would poison).
    """
    generator = torch.Generator().manual_seed(seed)
    heads = case.kv_heads * case.group
    shape = (case.batch, case.kv_heads, case.capacity, case.dim)
    query = torch.randn(case.batch, heads, case.dim, generator=generator)
    keys = torch.randn(shape, generator=generator)
    values = torch.randn(shape, generator=generator)
    mask = torch.rand(case.batch, case.capacity, generator=generator) > 0.25
    for row, pad in enumerate([0, 5, 11][: case.batch]):
        mask[row, :pad] = False
    mask[:, case.length - 1] = True  # the new token itself
    allowed = mask & (torch.arange(case.capacity) < case.length)
    hidden = ~allowed[:, None, :, None]
    clean_keys, clean_values = keys.masked_fill(hidden, 0.0), values.masked_fill(hidden, 0.0)
    keys, values = keys.masked_fill(hidden, float("nan")), values.masked_fill(hidden, float("nan"))
    length = torch.tensor([case.length], dtype=torch.int64)
    moved = [t.to(DEVICE, case.dtype) if t.is_floating_point() else t.to(DEVICE)
             for t in (query, keys, values, mask, length, clean_keys, clean_values, allowed)]
    return tuple(moved)


def _sdpa(query, keys, values, mask, scale):
    """SDPA over keys repeated once per query head (transformers' repeat_kv), fp32: `[batch, heads, dim]`."""
    group = query.shape[1] // keys.shape[1]
    repeated_keys = keys.float().repeat_interleave(group, dim=1)
    repeated_values = values.float().repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query.float()[:, :, None, :], repeated_keys, repeated_values,
                                         attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0, :]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_sdpa_and_ignores_garbage(case):
    query, keys, values, mask, length, clean_keys, clean_values, allowed = _inputs(case)
    scale = case.dim**-0.5
    got = decode_attention_reference(query, keys, values, mask, length, scale)
    expected = _sdpa(query, clean_keys, clean_values, allowed, scale).to(case.dtype)
    assert got.shape == query.shape and got.dtype == case.dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **TOLERANCE[case.dtype])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference_and_sdpa(kernels, case):
    query, keys, values, mask, length, clean_keys, clean_values, allowed = _inputs(case)
    scale = case.dim**-0.5
    got = _decode_attention_triton(query, keys, values, mask, length, scale, block_n=case.block_n,
                                   splits=case.splits)
    assert got.shape == query.shape and got.dtype == case.dtype
    assert torch.isfinite(got).all(), "garbage at or past length, or in masked slots, reached the output"
    reference = decode_attention_reference(query, clean_keys, clean_values, allowed, length, scale)
    torch.testing.assert_close(got, reference, **TOLERANCE[case.dtype])
    sdpa = _sdpa(query, clean_keys, clean_values, allowed, scale).to(case.dtype)
    torch.testing.assert_close(got, sdpa, **TOLERANCE[case.dtype])


def test_kernel_takes_strided_views(kernels):
    """Keys a layer of a stacked parent, values a transposed [batch, capacity, kv_heads, dim] buffer,
    query a slice of a wider tensor: the strides go to the kernel, nothing is copied."""
    case = Case(3, 2, 64, torch.float32, None)
    query, keys, values, mask, length, clean_keys, clean_values, allowed = _inputs(case)
    parent = torch.zeros(2, case.batch, case.kv_heads, case.capacity + 7, case.dim, device=DEVICE)
    parent[1, :, :, : case.capacity] = keys
    strided_keys = parent[1, :, :, : case.capacity]
    strided_values = values.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(case.batch, query.shape[1], 2 * case.dim, device=DEVICE)
    wide[..., case.dim:] = query
    strided_query = wide[..., case.dim:]
    sparse_mask = torch.zeros(case.batch, 2 * case.capacity, dtype=torch.bool, device=DEVICE)
    sparse_mask[:, ::2] = mask
    strided_mask = sparse_mask[:, ::2]
    assert not strided_keys.is_contiguous() and not strided_values.is_contiguous()
    assert not strided_query.is_contiguous() and not strided_mask.is_contiguous()
    got = _decode_attention_triton(strided_query, strided_keys, strided_values, strided_mask, length,
                                   case.dim**-0.5, block_n=16)
    expected = decode_attention_reference(query, clean_keys, clean_values, allowed, length, case.dim**-0.5)
    torch.testing.assert_close(got, expected, **TOLERANCE[case.dtype])


def test_kernel_and_reference_give_zeros_to_a_row_with_nothing_to_attend(kernels):
    case = Case(3, 2, 64, torch.float32, 2)
    query, keys, values, mask, length, *_ = _inputs(case)
    mask[1] = False
    for got in (decode_attention_reference(query, keys, values, mask, length, 0.125),
                _decode_attention_triton(query, keys, values, mask, length, 0.125, block_n=16, splits=2)):
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        assert torch.isfinite(got).all()


def test_kernel_compiles_as_one_opaque_op(kernels):
    """Under torch.compile(fullgraph=True) (dynamic shapes, as the fast-decode step marks the
    capacity dynamic) the kernel launch is not traced into, and gives the eager result."""
    case = Case(3, 2, 64, torch.float32, None)
    query, keys, values, mask, length, *_ = _inputs(case)

    def step(query, keys, values, mask, length):
        return decode_attention(query * 2, keys, values, mask, length, 0.125, backend="triton") + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(query, keys, values, mask, length),
                               step(query, keys, values, mask, length), atol=1e-6, rtol=1e-6)
    longer = Case(3, 2, 64, torch.float32, None, capacity=61, length=50)
    query, keys, values, mask, length, *_ = _inputs(longer, seed=1)
    torch.testing.assert_close(compiled(query, keys, values, mask, length),
                               step(query, keys, values, mask, length), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_dispatch_off_cuda_is_the_reference():
    case = Case(3, 2, 64, torch.float32, None)
    query, keys, values, mask, length, *_ = [t.cpu() for t in _inputs(case)]
    assert torch.equal(decode_attention(query, keys, values, mask, length, 0.125),
                       decode_attention_reference(query, keys, values, mask, length, 0.125))
    with pytest.raises(ValueError, match="backend must be"):
        decode_attention(query, keys, values, mask, length, 0.125, backend="flash")


def test_split_plan_fills_an_h200_and_covers_the_buffer():
    # Qwen3-4B, capacity 1280 in blocks of 64: batch size 1 -> 20 splits of one block; 16 -> 5; 64 -> 2; 128 -> 1
    assert split_plan(1 * 8, 1280) == (20, 64)
    assert split_plan(16 * 8, 1280) == (5, 256)
    assert split_plan(64 * 8, 1280) == (2, 640)
    assert split_plan(128 * 8, 1280) == (1, 1280)
    for rows in (1, 3, 8, 100, 1000):
        for capacity in (1, 15, 16, 45, 1280, 2048, 5000):
            splits, size = split_plan(rows, capacity)
            assert size % 64 == 0 and 1 <= splits <= 64
            assert (splits - 1) * size < capacity <= splits * size  # every split has slots of the buffer


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, m, n: (q[0], k, v, m, n), "query must be"),
    (lambda q, k, v, m, n: (q, k, v[:, :, :-1], m, n), "keys and values must both be"),
    (lambda q, k, v, m, n: (q[:, :3], k, v, m, n), "cannot be grouped"),
    (lambda q, k, v, m, n: (q, k, v, m.int(), n), "mask must be bool"),
    (lambda q, k, v, m, n: (q, k, v, m, n.int()), "length must be an int64"),
    (lambda q, k, v, m, n: (q, k.half(), v, m, n), "share a dtype"),
])
def test_bad_inputs_get_one_line_errors(change, message):
    case = Case(3, 2, 64, torch.float32, None)
    query, keys, values, mask, length, *_ = [t.cpu() for t in _inputs(case)]
    with pytest.raises(ValueError, match=message):
        decode_attention_reference(*change(query, keys, values, mask, length), 0.125)


def test_kernel_refuses_a_strided_head_dim(kernels):
    case = Case(1, 2, 64, torch.float32, None)
    query, keys, values, mask, length, *_ = _inputs(case)
    with pytest.raises(ValueError, match="keys must be contiguous in head_dim"):
        _decode_attention_triton(query, keys.transpose(2, 3).contiguous().transpose(2, 3), values, mask, length, 0.1)
