"""Packed prefills (`latentmas.packed_prefill`): a left-padded prompt's forward on its real tokens only
computes what the padded forward computes, writes the same cache, and runs only where it can."""

from __future__ import annotations

import pytest
import torch

from latentmas import packed_prefill
from latentmas.prefill import PrefillProbe
from latentmas.shared_cache import SegmentKey, SharedCache

LENGTHS = (11, 17, 6)  # the prompts' widths, in turn (the first on an empty cache)


def _masks(batch: int, n: int, index: int) -> torch.Tensor:
    """Left padding: row 0 loses index + 2 tokens, the last row one, the others none."""
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, : index + 2] = False
    mask[-1, :1] = False
    return mask


def _extends(lm, packed: bool, batch: int = 3, logits_last: bool = True, compiled: bool = False):
    """Three left-padded prefills on one cache: (their outputs, the last one's logits; every layer's real
    cached keys and values; the cache)."""
    generator = torch.Generator().manual_seed(3)
    shared = SharedCache(lm, batch, capacity=80, packed=packed, compiled=compiled)
    outputs = []
    for index, n in enumerate(LENGTHS):
        ids = torch.randint(0, 200, (batch, n), generator=generator)
        logits = logits_last and index == len(LENGTHS) - 1
        outputs.append(shared.extend(lm.model.get_input_embeddings()(ids), _masks(batch, n, index), ids,
                                     SegmentKey(f"a{index}", "prompt"), logits=logits))
    real = shared.mask[:, None, :, None]
    cached = [t[real.expand_as(t)] for layer in shared.cache.layers for t in (layer.keys, layer.values)]
    return outputs, cached, shared


@pytest.fixture
def calls(monkeypatch):
    """The packed attention's calls (the mask it was given each time)."""
    seen = []
    attention = packed_prefill.packed_rows_attention
    monkeypatch.setattr(packed_prefill, "packed_rows_attention",
                        lambda *args: seen.append(args[3]) or attention(*args))
    return seen


@pytest.mark.parametrize("model", ["tiny_lm", "fused_lm"])
def test_packed_prefills_compute_what_padded_ones_do(request, model, calls):
    lm = request.getfixturevalue(model)
    want, want_cached, padded = _extends(lm, packed=False)
    assert calls == []
    books = ("mask", "positions", "token_ids", "segment_ids", "next_position")
    want_books, storage = {name: getattr(padded, name) for name in books}, padded.storage
    del padded  # its storage, padding keys and all, goes to the packed run
    got, got_cached, packed = _extends(lm, packed=True)
    assert packed.storage is storage
    assert len(calls) == len(LENGTHS) * lm.num_layers  # every layer of every prefill ran packed
    assert got[-1].shape == (3, lm.model.config.vocab_size)
    for a, b in zip(got + got_cached, want + want_cached):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert want[-1].std() > 0.05 and want_cached[-1].std() > 0.05  # the weights make the check see something
    for name in books:
        assert torch.equal(getattr(packed, name), want_books[name]), name
    padding = ~packed.mask[:, None, :, None]
    for layer in packed.cache.layers:  # padding slots hold zeros, never another row's token
        assert not layer.keys[padding.expand_as(layer.keys)].any()
        assert not layer.values[padding.expand_as(layer.values)].any()
    assert lm.model.config._attn_implementation == "sdpa"  # given back


def test_compiled_packed_prefills_attend_through_one_opaque_op(tiny_lm, compiled_graphs):
    """Under torch.compile the packed attention is `latentmas::packed_rows_attention`, which the compiler
    does not look into, and the compiled packed prefill computes what the eager one does."""
    want, want_cached, _ = _extends(tiny_lm, packed=True)
    got, got_cached, _ = _extends(tiny_lm, packed=True, compiled=True)
    nodes = [node for gm in compiled_graphs for node in gm.graph.nodes]
    assert any(node.target is torch.ops.latentmas.packed_rows_attention.default for node in nodes)
    assert not any("scaled_dot_product" in str(node.target) for node in nodes)
    for a, b in zip(got + got_cached, want + want_cached):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_row_never_reads_another_rows_tokens(tiny_lm, calls):
    """Changing one row's prompt changes no other row's output or cache."""
    generator = torch.Generator().manual_seed(5)
    embeds = tiny_lm.model.get_input_embeddings()(torch.randint(0, 200, (3, 9), generator=generator))
    mask = _masks(3, 9, 1)
    results = []
    for changed in (False, True):
        shared = SharedCache(tiny_lm, 3, capacity=16)
        prompt = embeds.clone()
        if changed:
            prompt[1] += 1.0
        hidden = shared.extend(prompt, mask, torch.zeros(3, 9, dtype=torch.long), SegmentKey("a", "prompt"))
        results.append((hidden, shared.layer_keys()[-1].clone()))
    (before, keys_before), (after, keys_after) = results
    assert len(calls) == 2 * tiny_lm.num_layers  # both ran packed
    assert not torch.allclose(before[1], after[1])
    for row in (0, 2):
        torch.testing.assert_close(after[row], before[row], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(keys_after[row], keys_before[row], atol=1e-6, rtol=1e-6)


def test_the_mask_a_prompt_token_attends():
    cached = torch.tensor([[False, True], [True, True]])
    prompt = torch.tensor([[False, True, True], [True, True, True]])
    allowed = packed_prefill.attended(cached, prompt)
    assert allowed.shape == (2, 1, 3, 5)
    assert allowed[0, 0].int().tolist() == [[0, 1, 1, 0, 0],  # a padding token: itself only
                                            [0, 1, 0, 1, 0],
                                            [0, 1, 0, 1, 1]]
    assert allowed[1, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def _where(lm, batch: int, mask: torch.Tensor, logits: bool = False) -> bool:
    return packed_prefill.packable(SharedCache(lm, batch, capacity=8), mask, logits)


def test_it_packs_only_where_it_can(tiny_lm, monkeypatch):
    padded = _masks(2, 5, 0)
    assert _where(tiny_lm, 2, padded)
    assert _where(tiny_lm, 2, padded, logits=True)
    assert not _where(tiny_lm, 1, padded[:1])  # one row
    assert not _where(tiny_lm, 2, torch.ones(2, 5, dtype=torch.bool))  # nothing to leave out
    assert not _where(tiny_lm, 2, torch.tensor([[True], [False]]))  # one column (a latent step's)
    handle = tiny_lm.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: None)
    try:
        assert not _where(tiny_lm, 2, padded)  # hooks expect the padded forward
    finally:
        handle.remove()
    monkeypatch.setattr(tiny_lm.model.config, "final_logit_softcapping", 30.0, raising=False)
    assert _where(tiny_lm, 2, padded) and not _where(tiny_lm, 2, padded, logits=True)  # a head that does more
    monkeypatch.setattr(tiny_lm.model, "_supports_attention_backend", False)
    assert not _where(tiny_lm, 2, padded)  # attention layers of its own
    monkeypatch.undo()
    monkeypatch.setattr(tiny_lm.model.config, "_attn_implementation", "eager")
    assert not _where(tiny_lm, 2, padded)


def test_with_transformers_own_attention_prompts_prefill_padded(tiny_lm, calls, monkeypatch):
    from latentmas import shared_cache

    monkeypatch.setattr(shared_cache, "GROUPED_PREFILL", False)
    _extends(tiny_lm, packed=True)
    assert calls == []


def test_a_packed_prefill_after_a_knn_trim_computes_what_a_padded_one_does(tiny_lm, calls):
    """Rows trimmed to different lengths (`SharedCache.keep`, as kNN filtering does: padding inside the
    cache, kept positions) and then a packed prompt, against the same padded."""
    results = []
    for packed in (False, True):
        _, _, shared = _extends(tiny_lm, packed=packed, logits_last=False)
        keep = torch.Generator().manual_seed(4)
        shared.keep(torch.rand(shared.mask.shape, generator=keep) < 0.6)
        assert len(set(shared.mask.sum(dim=1).tolist())) > 1  # the rows hold different numbers of columns
        ids = torch.randint(0, 200, (3, 8), generator=torch.Generator().manual_seed(6))
        mask = _masks(3, 8, 2)
        before = len(calls)
        hidden = shared.extend(tiny_lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("judger", "prompt"),
                               logits=True)
        assert (len(calls) > before) == packed
        real = shared.mask[:, None, :, None]
        results.append([hidden] + [t[real.expand_as(t)] for layer in shared.cache.layers for t in (layer.keys,)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_a_probed_prefill_runs_padded_and_still_reads_right(tiny_lm, calls):
    """The query similarities of a probe (hooks: the padded forward) on a packed-prefilled cache equal
    those on a padded-prefilled one."""
    results = []
    for packed in (True, False):
        _, _, shared = _extends(tiny_lm, packed=packed, logits_last=False)
        generator = torch.Generator().manual_seed(9)
        ids = torch.randint(0, 200, (3, 7), generator=generator)
        mask = _masks(3, 7, 1)
        before = len(calls)
        with PrefillProbe(shared, mask, "query") as probe:
            shared.extend(tiny_lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("critic", "prompt"))
        assert len(calls) == before  # the probed prefill itself was padded
        results.append(probe.result())
    torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=2e-5)
    assert results[1].std() > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("method", ["latent_mas", "text_mas"])
def test_a_run_decodes_and_captures_the_same_packed_or_padded(tiny_lm, fake_problems, tmp_path, method, calls):
    """Whole runs at batch size 3 (prompts of different lengths): the same answers and, for latent_mas,
    the same hand-offs in the capture file, with prompts packed and padded."""
    from captures import assert_same_handoffs, solve_and_capture

    from capture.selection import DEFAULT_TRANSITIONS
    from latentmas.config import RunConfig

    problems = fake_problems()
    runs = {}
    for packed in (False, True):
        cfg = RunConfig(model_name="tiny-qwen3", device="cpu", method=method, latent_steps=3, max_new_tokens=24,
                        packed_prefill=packed)
        path = tmp_path / f"{packed}.h5"
        before = len(calls)
        results = solve_and_capture(tiny_lm, problems, cfg, path if method == "latent_mas" else None, 3)
        runs[packed] = (results, path, len(calls) - before)
    assert runs[False][2] == 0 and runs[True][2] > 0
    assert [r.output for r in runs[True][0]] == [r.output for r in runs[False][0]]
    assert all(r.agents[-1].output_tokens > 0 for r in runs[True][0])
    if method == "latent_mas":
        assert_same_handoffs(runs[False][1], runs[True][1], atol=2e-3, names=DEFAULT_TRANSITIONS)
