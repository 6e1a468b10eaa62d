"""Fused sibling projections (`latentmas.fused_projections`) compute what the separate ones compute."""

from __future__ import annotations

import pytest
import torch

from latentmas.fused_projections import GroupMember, ProjectionGroup, SkinnyLinear, fuse_projections
from latentmas.shared_cache import SegmentKey, SharedCache


def _prompts(lm, *questions):
    encoded = lm.tokenizer(list(questions), return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"].bool()


def test_a_fused_model_computes_the_same_logits_with_the_same_parameters(tiny_lm, fused_lm):
    attention = fused_lm.model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, GroupMember) and isinstance(attention.qkv_proj, ProjectionGroup)
    assert isinstance(fused_lm.model.model.layers[0].mlp.up_proj, GroupMember)
    assert type(attention.o_proj) is SkinnyLinear and type(fused_lm.model.model.layers[0].mlp.down_proj) is SkinnyLinear
    names = {name.replace("qkv_proj", "q_proj").replace("gate_up_proj", "gate_proj") for name in fused_lm.model.state_dict()}
    assert {n for n in names if "o_proj" in n or "down_proj" in n} == {
        n for n in tiny_lm.model.state_dict() if "o_proj" in n or "down_proj" in n}  # singles keep their names
    assert sum(p.numel() for p in fused_lm.model.parameters()) == sum(p.numel() for p in tiny_lm.model.parameters())
    ids, mask = _prompts(tiny_lm, "What is 2 + 3?", "Add 17 and 25, then halve it.")
    with torch.no_grad():
        plain = tiny_lm.model(input_ids=ids, attention_mask=mask.long()).logits
        fused = fused_lm.model(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert plain.std() > 0.05  # logits that vary: a comparison that could fail


def test_members_compute_their_own_rows_in_any_order_of_calls():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(8, n, bias=True) for n in (6, 2, 2)]
    group = ProjectionGroup(linears)
    members = [GroupMember(group, i) for i in range(3)]
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        expected = [linear(x) for linear in linears]
        for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
            for i in order:
                torch.testing.assert_close(members[i](x), expected[i])
        members[0](x)
        torch.testing.assert_close(members[1](y), linears[1](y))  # another input: computed afresh
        torch.testing.assert_close(members[2](x), expected[2])
    assert group._input is None  # the last member cleared what the group kept


def test_a_members_weight_is_a_view_of_the_group():
    linears = [torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 5, bias=False)]
    expected = linears[1].weight.detach().clone()
    group = ProjectionGroup(linears)
    member = GroupMember(group, 1)
    torch.testing.assert_close(member.weight, expected)
    with torch.no_grad():
        member.weight.mul_(2.0)  # as tests scale q_proj/k_proj weights in place
        torch.testing.assert_close(member(torch.eye(4)), 2 * expected.T)
    assert member.bias is None


def test_unlike_siblings_are_left_alone():
    module = torch.nn.Module()
    module.gate_proj = torch.nn.Linear(4, 6, bias=False)
    module.up_proj = torch.nn.Linear(4, 6, bias=True)  # one with a bias, one without
    assert fuse_projections(module) == 0
    assert type(module.up_proj) is torch.nn.Linear


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_fast_decode_on_a_fused_model_matches_the_plain_loop(tiny_lm, fused_lm, fake_problems, temperature):
    from latentmas.config import RunConfig
    from latentmas.methods import get_method
    from latentmas.tasks import get_task

    problems = fake_problems()[:3]
    outputs = {}
    for name, lm, fast in (("plain", tiny_lm, False), ("fused fast", fused_lm, True)):
        cfg = RunConfig(model_name="tiny-qwen3", device="cpu", method="latent_mas", latent_steps=3, max_new_tokens=16,
                        temperature=temperature, fast_decode=fast)
        outputs[name] = [r.output for r in get_method("latent_mas")(lm, problems, get_task("gsm8k"), cfg)]
    assert outputs["fused fast"] == outputs["plain"]
    if temperature > 0:
        assert len(set(outputs["plain"])) > 1  # sampled apart: a comparison that could fail


def test_nothing_is_kept_after_a_forward_pass_or_a_lone_call(fused_lm):
    from latentmas.prefill import _pre_rope_queries

    groups = [m for m in fused_lm.model.modules() if isinstance(m, ProjectionGroup)]
    ids, mask = _prompts(fused_lm, "What is 2 + 3?")
    with torch.no_grad():
        fused_lm.model(input_ids=ids)
        assert groups and all(g._input is None and g._outputs == () for g in groups)
        attention = fused_lm.model.model.layers[0].self_attn
        hidden = torch.randn(1, 5, fused_lm.hidden_size)
        queries = _pre_rope_queries(attention, hidden, fused_lm.head_dim)
        assert attention.qkv_proj._input is None  # the query alone keeps nothing behind
        expected = attention.q_norm((hidden @ attention.q_proj.weight.T).view(1, 5, -1, fused_lm.head_dim))
        torch.testing.assert_close(queries, expected)


def test_a_sibling_out_of_turn_computes_afresh():
    torch.manual_seed(1)
    linears = [torch.nn.Linear(4, 3, bias=False) for _ in range(3)]
    group = ProjectionGroup(linears)
    members = [GroupMember(group, i) for i in range(3)]
    x = torch.randn(2, 4)
    with torch.no_grad():
        members[0](x)
        x.mul_(3.0)  # changed in place between calls: a sibling in turn would hand out the old product
        torch.testing.assert_close(members[2](x), linears[2](x))  # out of turn (1 was skipped): afresh


def test_prefills_run_without_cudnn_attention(tiny_lm):
    """`SharedCache.extend` runs the model with `PREFILL_BACKENDS` (cuDNN's SDPA off), and only there."""
    seen = []
    layer = tiny_lm.model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        ids, mask = _prompts(tiny_lm, "What is 2 + 3?")
        SharedCache(tiny_lm, 1).extend(tiny_lm.model.get_input_embeddings()(ids), mask, ids,
                                       SegmentKey("planner", "prompt"))
    finally:
        handle.remove()
    assert seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()
