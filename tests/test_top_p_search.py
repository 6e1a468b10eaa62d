"""latentmas.top_p_search: top-p's cut found by a search over 16-bit keys drops what the sort drops."""

from __future__ import annotations

import shutil

import pytest
import torch

from latentmas import top_p_search
from latentmas.sampling import sample_tokens, warp_logits

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
SETTINGS = [(0.6, 0, 0.95), (1.3, 0, 0.5), (0.9, 700, 0.999), (1.0, 0, 0.0), (0.3, 3, 0.9), (2.0, 0, 0.2)]


@pytest.fixture
def ties_in_index_order(monkeypatch, request):
    """On the CPU, the warpers' sort made stable: CUDA's radix sort keeps ties in index order as the
    search does, torch's CPU sort does not."""
    if request.node.callspec.params.get("device", "cpu") == "cpu":
        _sort_stably(monkeypatch)


def _sort_stably(monkeypatch):
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *args, **kwargs: sort(x, *args, **{**kwargs, "stable": True}))


def _rows(dtype, device, seed):
    """`[6, 5000]` 16-bit logits with a top-k-like -inf run, a row of few distinct values, ties at the max."""
    logits = (torch.randn(6, 5000, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    logits[0, :300] = -float("inf")
    logits[1] = logits[1].round()
    logits[2, 100:150] = logits[2].max()
    logits[3, ::7] = 0.0
    logits[3, 1::7] = -0.0
    return logits.to(device)


def _searched(logits, temperature, top_k, top_p):
    """What the search drops, given the warpers' temperature and top-k (as `warp_logits` applies them)."""
    warped, keys = logits.float() / temperature, logits
    if top_k:
        cut = warped < torch.topk(warped, top_k)[0][..., -1, None]
        warped, keys = warped.masked_fill(cut, -float("inf")), keys.masked_fill(cut, -float("inf"))
    return top_p_search.top_p_drops(warped.softmax(dim=-1), keys, top_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_drops_what_the_sort_drops(dtype, seed, device, ties_in_index_order):
    logits = _rows(dtype, device, seed)
    finite = torch.isfinite(logits)
    for temperature, top_k, top_p in SETTINGS:
        sorted_drops = torch.isinf(warp_logits(logits.float(), temperature, top_k, top_p, sort_keys=logits)) & finite
        searched = _searched(logits, temperature, top_k, top_p) & finite
        assert torch.equal(searched, sorted_drops), (temperature, top_k, top_p)
        assert bool((~searched & finite).any(dim=-1).all())  # every row keeps a token


def test_ties_at_the_cut_drop_in_index_order_by_hand():
    # probabilities 0.1252 for each 0 and 0.499 for the 1.383: top-p 0.7 drops ties while their sum <= 0.3
    row = torch.tensor([[0.0, 1.383, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    assert _searched(row, 1.0, 0, 0.7)[0].tolist() == [True, False, True, False, False]
    maxima = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.bfloat16)  # top-p 0 keeps the last of the largest
    assert _searched(maxima, 1.0, 0, 0.0)[0].tolist() == [True, True, True, False]
    assert not _searched(maxima, 1.0, 0, 0.999)[0].any()


def test_ordered_codes_follow_the_float_order():
    values = torch.tensor([-float("inf"), -3e4, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 3e4, float("inf")])
    for dtype in (torch.bfloat16, torch.float16):
        codes = top_p_search.ordered_codes(values.to(dtype)[None])[0]
        assert codes.dtype == torch.int32 and bool((codes >= -(1 << 15)).all() and (codes < 1 << 15).all())
        assert torch.equal(codes.sort().values, codes)
        distinct = torch.unique(values.to(dtype))  # -0.0 == 0.0; float16 flushes 1e-30 to 0
        assert len(torch.unique(codes)) == len(distinct)


@pytest.mark.parametrize(("vocab", "width"), [(100, 16), (1024, 1024), (3000, 1024), (7, 4)])
def test_nth_true_is_the_index_of_the_nth_true(vocab, width):
    mask = torch.rand(8, vocab, generator=torch.Generator().manual_seed(vocab)) < 0.3
    mask[:, -1] = True
    counts = mask.sum(dim=-1)
    n = (torch.rand(8, generator=torch.Generator().manual_seed(1)) * counts).long().clamp_max(counts - 1)
    found = top_p_search._nth_true(mask, n, width)
    expected = [row.nonzero()[k, 0].item() for row, k in zip(mask, n.tolist())]
    assert found.tolist() == expected


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
def test_the_compiled_sampler_searches_in_one_graph_and_draws_what_the_sort_draws(monkeypatch):
    """Switched on (`top_p_search.ENABLED`), the compiled sampler takes the search, in one graph; off (the
    default) it sorts, and breaks its graph at the cumulative sum."""
    monkeypatch.setattr(top_p_search, "ENABLED", True)
    torch._dynamo.reset()
    logits = _rows(torch.bfloat16, "cpu", 5)[:, :1500]
    keys = torch.arange(6, dtype=torch.int64) * 5 + 1
    step = torch.tensor([3])
    assert torch._dynamo.explain(sample_tokens)(logits, keys, step, 0.6, 0, 0.95).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(sample_tokens, dynamic=False)
    drawn = [compiled(logits, keys, step + i, 0.6, 0, 0.95) for i in range(4)]
    _sort_stably(monkeypatch)
    assert not top_p_search.wanted(logits)  # eagerly: the sort
    for i, tokens in enumerate(drawn):
        assert torch.equal(tokens, sample_tokens(logits, keys, step + i, 0.6, 0, 0.95))
    monkeypatch.setattr(top_p_search, "ENABLED", False)
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(sample_tokens)(logits, keys, step, 0.6, 0, 0.95).break_reasons
    assert breaks and all("_cumulative_sum" in b.reason for b in breaks)
    torch._dynamo.reset()
