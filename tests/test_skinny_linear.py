"""skinny_linear: the few-row projection kernels against an fp32 product, and the dispatch around them.

On CPU the kernels run in triton's interpreter in a child pytest (tests/triton_interpreter.py); on
CUDA they run here.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import DEVICE, interpreter_child_test, kernels_fixture

from latentmas.kernels.skinny_linear import MAX_ROWS, Plan, plan, skinny_linear, usable

module = importlib.import_module("latentmas.kernels.skinny_linear")


kernels = kernels_fixture(module)
test_kernels_in_the_triton_interpreter = interpreter_child_test(__file__, module)


@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("shape, tiles", [
    ((96, 200), None),  # K not a multiple of the tile: masked loads
    ((130, 1024), Plan(32, 64, 4)),  # N not a multiple of BLOCK_N, four K slices summed
    ((64, 640), Plan(64, 128, 3)),  # slices of unequal use: 640 = 3 x 256 - 128
    ((48, 256), Plan(16, 128, 1, warps=8, stages=4)),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_an_fp32_product(kernels, rows, shape, tiles, with_bias):
    n, k = shape
    generator = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=generator).to(DEVICE, torch.bfloat16)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=generator).to(DEVICE, torch.bfloat16) if with_bias else None
    got = module._skinny_linear_triton(x, weight, bias, tiles)
    want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    # one rounding to bf16 of an fp32 sum: within half an ulp (2**-9 relative) of the largest value
    torch.testing.assert_close(got.float(), want, atol=want.abs().max().item() * 2 ** -8, rtol=2 ** -8)
    again = module._skinny_linear_triton(x, weight, bias, tiles)
    assert torch.equal(got, again)  # no atomics: the same bits every time


def test_kernel_on_a_row_view_of_a_wider_tensor(kernels):
    """x may be a view whose rows are further apart than K (a slice of a larger activation)."""
    wide = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    weight = torch.randn(40, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    x = wide[:, :256]
    got = module._skinny_linear_triton(x, weight)
    torch.testing.assert_close(got.float(), F.linear(x.float(), weight.float()), atol=0.1, rtol=2 ** -8)


def test_plan_depends_on_the_shape_only_and_splits_long_products():
    assert plan(1, 2560, 9728) == plan(1, 2560, 9728)
    assert plan(1, 2560, 9728).split_k > 1  # 160 programs alone would leave most of an H200 idle
    assert plan(1, 19456, 2560).split_k == 1
    for rows in (1, 4, MAX_ROWS):
        tiles = plan(rows, 6144, 2560)
        assert 2560 // tiles.split_k >= tiles.block_k


def test_elsewhere_it_is_f_linear(monkeypatch):
    monkeypatch.setenv("LATENTMAS_SKINNY_LINEAR", "1")
    x, weight = torch.randn(2, 5, 8), torch.randn(3, 8)
    assert not usable(x, weight)  # CPU tensors
    assert torch.equal(skinny_linear(x, weight), F.linear(x, weight))
    if DEVICE == "cuda":
        big = torch.randn(MAX_ROWS + 1, 8, device="cuda", dtype=torch.bfloat16)
        assert not usable(big, weight.to("cuda", torch.bfloat16))
        assert not usable(big[:2].float(), weight.to("cuda"))  # fp32 stays with cuBLAS


def test_bad_shapes_get_one_line_errors():
    with pytest.raises(ValueError, match="at most"):
        module._check(torch.zeros(MAX_ROWS + 1, 4), torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match=r"x \[rows, K\]"):
        module._check(torch.zeros(2, 4), torch.zeros(3, 5), None)
    with pytest.raises(ValueError, match="must match"):
        module._check(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64), None)


@pytest.mark.skipif(DEVICE != "cuda", reason="the kernels in a model need CUDA")
def test_a_bf16_model_computes_what_cublas_computes(tiny_lm_cache_env, monkeypatch):
    """tiny-qwen3 in bf16 on CUDA: logits at 1..MAX_ROWS tokens with the kernels (LATENTMAS_SKINNY_LINEAR=1)
    and with cuBLAS."""
    from latentmas.models import load_model

    lm = load_model("tiny-qwen3", "cuda", fuse_projections=True)
    lm.model.to(torch.bfloat16)
    ids = torch.randint(0, 200, (MAX_ROWS, 1), device="cuda")
    with torch.no_grad():
        monkeypatch.setenv("LATENTMAS_SKINNY_LINEAR", "1")
        assert usable(ids.new_zeros(MAX_ROWS, 8, dtype=torch.bfloat16), ids.new_zeros(4, 8, dtype=torch.bfloat16))
        ours = lm.model(input_ids=ids).logits.float()
        monkeypatch.setenv("LATENTMAS_SKINNY_LINEAR", "0")
        theirs = lm.model(input_ids=ids).logits.float()
    assert theirs.std() > 0.05
    torch.testing.assert_close(ours, theirs, atol=0.05 * theirs.abs().max().item(), rtol=0.05)
