"""grouped_step_attention computes what transformers' SDPA path (with repeat_kv) computes."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from latentmas.step_attention import grouped_step, grouped_step_attention


class _Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_sdpa_with_repeated_keys(heads, kv_heads, dtype):
    generator = torch.Generator().manual_seed(0)
    batch, capacity, dim = 3, 37, 16
    query = torch.randn(batch, heads, 1, dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, capacity, dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, capacity, dim, generator=generator).to(dtype)
    mask = torch.rand(batch, 1, 1, capacity, generator=generator) > 0.4
    mask[:, :, :, 0] = True
    module = _Module(heads // kv_heads)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim**-0.5)
    got, weights = grouped_step_attention(module, query, key, value, mask, scaling=dim**-0.5)
    assert weights is None and got.shape == expected.shape == (batch, 1, heads, dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_refuses_more_than_one_token_without_a_chunks_mask():
    query = torch.zeros(1, 4, 2, 8)
    kv = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="one token"):
        grouped_step_attention(None, query, kv, kv, torch.ones(1, 1, 1, 5, dtype=torch.bool))


def test_switches_the_model_back(tiny_lm):
    before = tiny_lm.model.config._attn_implementation
    with pytest.raises(RuntimeError), grouped_step(tiny_lm.model):
        assert tiny_lm.model.config._attn_implementation != before
        raise RuntimeError
    assert tiny_lm.model.config._attn_implementation == before
