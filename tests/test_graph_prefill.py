"""Prompt prefills through fixed-size chunks (`latentmas.graph_prefill`): `SharedCache.extend` with
`graphed=True` leaves the cache (real columns' keys and values, bookkeeping) and returns the state
that the eager forward does, over several chunks, a partly real last one, left padding and a
non-empty cache; a hooked model, and a cache on storage of its own, prefill eagerly. On the CPU the
chunks run eagerly; their CUDA graphs are checked in `tests/test_cuda.py`."""

from __future__ import annotations

import gc

import pytest
import torch

from latentmas import graph_prefill
from latentmas.shared_cache import SegmentKey, SharedCache

LENGTHS = (9, 40, 13, 75)  # prompt lengths in turn (the first on an empty cache); with 32-column chunks
# these are one partial chunk, two chunks (the last partial), one, and three


def _prefills(lm, graphed: bool, batch: int):
    """Each prefill's output (the last one's logits), the real columns' keys and values of every layer,
    and the bookkeeping `[batch, T]`; row 0 left-padded when batch > 1."""
    generator = torch.Generator().manual_seed(5)
    lm.static_steps.clear()
    gc.collect()
    shared = SharedCache(lm, batch, capacity=sum(LENGTHS) + 8, graphed=graphed)
    outputs = []
    for index, n in enumerate(LENGTHS):
        ids = torch.randint(0, 200, (batch, n), generator=generator).to(lm.device)
        mask = torch.ones(batch, n, dtype=torch.bool, device=lm.device)
        if batch > 1:
            mask[0, : index + 3] = False
        outputs.append(shared.extend(lm.model.get_input_embeddings()(ids), mask, ids,
                                     SegmentKey(f"agent{index}", "prompt"), logits=index == len(LENGTHS) - 1))
    real = shared.mask[:, None, :, None]
    cached = [tensor[real.expand_as(tensor)] for layer in shared.cache.layers for tensor in (layer.keys, layer.values)]
    books = (shared.mask, shared.positions, shared.token_ids, shared.segment_ids, shared.next_position)
    chunks = sorted(key[1] for key in lm.static_steps if key[0] == "prefill")
    del shared
    return outputs, cached, books, chunks


def test_chunk_sizes():
    assert graph_prefill.chunk_sizes(200, 1) == [224]
    assert graph_prefill.chunk_sizes(600, 1) == [512, 96]
    assert graph_prefill.chunk_sizes(32, 16) == [32]
    assert graph_prefill.largest_chunk(64) == 256 and graph_prefill.largest_chunk(10_000) == graph_prefill.QUANTUM
    assert sum(graph_prefill.chunk_sizes(1000, 64)) == 1024


@pytest.mark.parametrize("model", ["tiny_lm", "fused_lm"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_prefills_compute_what_eager_ones_do(request, monkeypatch, model, batch):
    lm = request.getfixturevalue(model)
    monkeypatch.setattr(graph_prefill, "LARGEST", 32)
    want, want_cached, want_books, none = _prefills(lm, graphed=False, batch=batch)
    got, got_cached, got_books, chunks = _prefills(lm, graphed=True, batch=batch)
    assert none == [] and chunks == [32]  # the graphed run went through 32-column chunks
    assert got[-1].shape == (batch, lm.model.config.vocab_size)
    for a, b in zip(got_books, want_books):
        assert torch.equal(a, b)
    for a, b in zip(got + got_cached, want + want_cached):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert want[-1].std() > 0.05 and want_cached[-1].std() > 0.05  # the weights make the check see something


def test_chunks_of_several_sizes_and_a_longer_prompt(tiny_lm):
    """Without a patched limit each prefill is one chunk of its own size (rounded up to 32 columns)."""
    want, want_cached, _, _ = _prefills(tiny_lm, graphed=False, batch=2)
    got, got_cached, _, chunks = _prefills(tiny_lm, graphed=True, batch=2)
    assert chunks == [32, 64, 96]
    for a, b in zip(got + got_cached, want + want_cached):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_a_hooked_model_and_a_second_cache_prefill_eagerly(tiny_lm):
    """Hooks read the forward pass (capture's prefill probes), so a hooked model prefills eagerly; a
    cache on storage of its own (another cache holds the model's) too."""
    ids = torch.arange(3, 40)[None]
    embeds = tiny_lm.model.get_input_embeddings()(ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    calls = []
    tiny_lm.static_steps.clear()
    gc.collect()
    first = SharedCache(tiny_lm, 1, graphed=True)
    handle = tiny_lm.model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        first.extend(embeds, mask, ids, SegmentKey("planner", "prompt"))
    finally:
        handle.remove()
    assert calls == [1] and not tiny_lm.static_steps
    second = SharedCache(tiny_lm, 1, graphed=True)
    assert second.storage is not tiny_lm.kv_storage
    second.extend(embeds, mask, ids, SegmentKey("planner", "prompt"))
    assert not tiny_lm.static_steps and second.length == ids.shape[1]
    first.extend(embeds, mask, ids, SegmentKey("critic", "prompt"))
    assert ("prefill", 64, False) in tiny_lm.static_steps  # the model's storage: chunks
    del first, second


def test_batches_above_the_limit_prefill_eagerly(tiny_lm, monkeypatch):
    monkeypatch.setattr(graph_prefill, "BATCH_LIMIT", 2)
    _, _, _, chunks = _prefills(tiny_lm, graphed=True, batch=3)
    assert chunks == []
    _, _, _, chunks = _prefills(tiny_lm, graphed=True, batch=2)
    assert chunks == [32, 64, 96]


def _probed_capture(lm, problems, path, batch_size, similarity, fast):
    from captures import solve_and_capture, tiny_config

    cfg = tiny_config(similarity=similarity, fast_decode=fast, latent_steps=2, max_new_tokens=6)
    return [r.output for r in solve_and_capture(lm, problems, cfg, path, batch_size, capture_dtype="float32")]


@pytest.mark.parametrize("similarity", ["query", "attention"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_prefill_probes_read_graphed_chunks_as_they_read_hooked_prefills(tiny_lm, fake_problems, tmp_path,
                                                                        similarity, batch_size):
    """Capture's `query` and `attention` modes watch a prefill in chunks through the queries the chunks
    keep (`PrefillProbe.take_prefill`), not hooks: the hand-offs are those of hooked eager prefills."""
    from captures import assert_same_handoffs

    problems = fake_problems()
    tiny_lm.static_steps.clear()
    eager = _probed_capture(tiny_lm, problems, tmp_path / "eager.h5", batch_size, similarity, fast=False)
    graphed = _probed_capture(tiny_lm, problems, tmp_path / "graphed.h5", batch_size, similarity, fast=True)
    assert graphed == eager
    assert any(key[0] == "prefill" and key[2] for key in tiny_lm.static_steps)  # watched chunks ran
    assert_same_handoffs(tmp_path / "eager.h5", tmp_path / "graphed.h5", atol=1e-4)


def test_a_probe_hooks_the_prefill_when_the_chunks_do_not_run(tiny_lm, fake_problems, tmp_path, monkeypatch):
    """A probe that asked for the chunks' queries, on a prefill that runs eagerly after all, hooks it."""
    from captures import assert_same_handoffs

    problems = fake_problems()[:2]
    tiny_lm.static_steps.clear()
    _probed_capture(tiny_lm, problems, tmp_path / "graphed.h5", 1, "query", fast=True)
    monkeypatch.setattr(graph_prefill, "prefill", lambda *args: None)
    _probed_capture(tiny_lm, problems, tmp_path / "fallback.h5", 1, "query", fast=True)
    assert_same_handoffs(tmp_path / "graphed.h5", tmp_path / "fallback.h5", atol=1e-4)
