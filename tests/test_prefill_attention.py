"""A prefill's attention on the unrepeated grouped-query keys (`latentmas.prefill_attention`) computes what
transformers' SDPA path (which repeats them) computes, alone and as `SharedCache.extend`'s attention."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from latentmas import prefill_attention, shared_cache, step_attention
from latentmas.prefill_attention import grouped_prefill, grouped_prefill_attention, grouped_rows
from latentmas.shared_cache import SegmentKey, SharedCache


class _Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _inputs(heads, kv_heads, n, length, dtype, generator):
    batch, dim = 3, 16
    query = torch.randn(batch, heads, n, dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    return query, key, value


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("additive", [False, True])
def test_matches_sdpa_with_repeated_keys(heads, kv_heads, dtype, additive):
    generator = torch.Generator().manual_seed(1)
    n, length = 7, 29
    query, key, value = _inputs(heads, kv_heads, n, length, dtype, generator)
    allowed = torch.rand(3, 1, n, length, generator=generator) > 0.5
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf")) if additive else allowed
    module = _Module(heads // kv_heads)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, weights = grouped_prefill_attention(module, query, key, value, mask, scaling=0.3)
    assert weights is None and got.shape == expected.shape == (3, n, heads, 16)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    assert expected.float().std() > 0.1


def test_grouped_rows_repeat_the_mask_over_a_groups_heads():
    mask = torch.arange(2 * 3 * 5).reshape(2, 1, 3, 5)
    rows = grouped_rows(mask, 4)
    assert rows.shape == (2, 1, 12, 5)
    for head in range(4):
        assert torch.equal(rows[:, :, head * 3: (head + 1) * 3], mask)


def test_additive_rows_are_the_groups_rows_aligned():
    allowed = torch.rand(2, 1, 3, 21, generator=torch.Generator().manual_seed(4)) > 0.5
    bias = prefill_attention.additive_rows(allowed, 2, torch.bfloat16)
    assert bias.shape == (2, 1, 6, 21) and bias.dtype == torch.bfloat16 and bias.stride(2) == 32
    assert torch.equal(bias == 0, prefill_attention.grouped_rows(allowed, 2))
    assert torch.isneginf(bias[bias != 0]).all()


def test_without_a_mask_it_is_transformers_path(monkeypatch):
    calls = []
    monkeypatch.setattr(step_attention, "grouped_rows_attention", lambda *a: calls.append(a))
    query, key, value = _inputs(8, 2, 5, 5, torch.float32, torch.Generator().manual_seed(2))
    module = _Module(4)
    got, _ = grouped_prefill_attention(module, query, key, value, None, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    assert calls == [] and torch.equal(got, expected)


def _extends(lm, grouped: bool, monkeypatch):
    """Three left-padded prefills on one cache, padding included (not `packed_prefill`'s forward): each one's
    output (the last one's logits) and every layer's real cached keys and values."""
    monkeypatch.setattr(shared_cache, "GROUPED_PREFILL", grouped)
    generator = torch.Generator().manual_seed(3)
    shared = SharedCache(lm, 3, capacity=80, packed=False)
    outputs = []
    for index, n in enumerate((11, 17, 6)):
        ids = torch.randint(0, 200, (3, n), generator=generator)
        mask = torch.ones(3, n, dtype=torch.bool)
        mask[0, : index + 2] = False
        mask[2, :1] = False
        outputs.append(shared.extend(lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey(f"a{index}", "prompt"),
                                     logits=index == 2))
    real = shared.mask[:, None, :, None]
    cached = [t[real.expand_as(t)] for layer in shared.cache.layers for t in (layer.keys, layer.values)]
    return outputs + cached


@pytest.mark.parametrize("model", ["tiny_lm", "fused_lm"])
def test_shared_cache_prefills_read_the_grouped_keys_and_compute_the_same(request, model, monkeypatch):
    lm = request.getfixturevalue(model)
    want = _extends(lm, grouped=False, monkeypatch=monkeypatch)
    calls = []
    rows_attention = step_attention.grouped_rows_attention
    monkeypatch.setattr(step_attention, "grouped_rows_attention", lambda *a: calls.append(a[3]) or rows_attention(*a))
    got = _extends(lm, grouped=True, monkeypatch=monkeypatch)
    assert len(calls) == 3 * lm.num_layers  # every layer of every prefill attended the grouped way
    groups = lm.num_heads // lm.num_kv_heads
    for rows in calls:  # on the mask transformers made once per forward: additive, the group's rows, aligned
        assert rows.dtype == lm.dtype and rows.shape[2] % groups == 0 and rows.stride(2) % prefill_attention.ALIGN == 0
    assert len({rows.data_ptr() for rows in calls}) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert want[2].std() > 0.05 and want[-1].std() > 0.05  # the weights make the check see something
    assert lm.model.config._attn_implementation == prefill_attention.REPLACES


def test_other_implementations_are_left_alone(tiny_lm, monkeypatch):
    monkeypatch.setattr(tiny_lm.model.config, "_attn_implementation", "eager")
    with grouped_prefill(tiny_lm.model):
        assert tiny_lm.model.config._attn_implementation == "eager"
    monkeypatch.undo()
    with pytest.raises(RuntimeError), grouped_prefill(tiny_lm.model):
        assert tiny_lm.model.config._attn_implementation == prefill_attention.NAME
        raise RuntimeError
    assert tiny_lm.model.config._attn_implementation == "sdpa"


def test_compiled_prefills_attend_through_one_opaque_op(tiny_lm, monkeypatch, compiled_graphs):
    """Under torch.compile the attention is `latentmas::grouped_rows_attention`, which the compiler does not
    look into, and the compiled prefill computes what the eager one does."""
    want = _extends(tiny_lm, grouped=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(SharedCache, "__init__", _compiled_init(SharedCache.__init__))
    got = _extends(tiny_lm, grouped=True, monkeypatch=monkeypatch)
    nodes = [node for gm in compiled_graphs for node in gm.graph.nodes]
    assert any(node.target is torch.ops.latentmas.grouped_rows_attention.default for node in nodes)
    assert not any("scaled_dot_product" in str(node.target) for node in nodes)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _compiled_init(init):
    def compiled(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "compiled": True})
    return compiled
