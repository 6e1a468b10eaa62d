"""Compiled prompt prefills (`latentmas.compiled_prefill`): the shared cache's `extend` with the decoder's
layers running one torch.compile'd forward computes what the eager forward computes, the layers share
their graphs, and a hooked model runs eagerly.

The compiler here is dynamo with a counting, eager backend (`CompileCounterWithBackend("eager")`): the
graphs dynamo captures run op for op, so results must be equal, and the count says the compiled path
ran (and was not compiled again for new lengths). Inductor's own numerics are checked on CUDA
(`tests/test_cuda.py`, compiled cases)."""

from __future__ import annotations

import pytest
import torch

from latentmas import compiled_prefill
from latentmas.shared_cache import SegmentKey, SharedCache

LENGTHS = (9, 13, 11, 12)  # prompt lengths of the prefills in turn (the first on an empty cache)


@pytest.fixture
def counter(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    counting = CompileCounterWithBackend("eager")
    monkeypatch.setattr(compiled_prefill, "BACKEND", counting)
    monkeypatch.setattr(compiled_prefill, "_COMPILED", {})
    torch._dynamo.reset()
    yield counting
    torch._dynamo.reset()


def _prefills(lm, compiled: bool, logits: bool = False, batch: int = 2, packed: bool = True,
              lengths: tuple[int, ...] = LENGTHS):
    """Each prefill's output and, at the end, the cache's keys (zeros in padding slots): prompts left padded
    in row 0 (forwards on their real tokens only unless not `packed`, `packed_prefill`)."""
    generator = torch.Generator().manual_seed(3)
    shared = SharedCache(lm, batch, capacity=sum(lengths) + 8, compiled=compiled, packed=packed)
    outputs = []
    for index, n in enumerate(lengths):
        ids = torch.randint(0, 100, (batch, n), generator=generator).to(lm.device)
        mask = torch.ones(batch, n, dtype=torch.bool, device=lm.device)
        mask[0, : index + 2] = False
        embeds = lm.model.get_input_embeddings()(ids)
        outputs.append(shared.extend(embeds, mask, ids, SegmentKey(f"agent{index}", "prompt"),
                                     logits=logits and index == len(lengths) - 1))
    padding = ~shared.mask[:, None, :, None]  # its slots: zeros packed, the padding's keys padded; never read
    return outputs, [keys.masked_fill(padding, 0) for keys in shared.layer_keys()]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("model", ["tiny_lm", "fused_lm"])
def test_compiled_prefills_compute_what_eager_ones_do(request, counter, model, packed):
    lm = request.getfixturevalue(model)
    want, want_keys = _prefills(lm, compiled=False, logits=True, packed=packed)
    got, got_keys = _prefills(lm, compiled=True, logits=True, packed=packed)
    assert got[-1].shape == (2, lm.model.config.vocab_size)  # the last one asked for logits
    for a, b in zip(got + got_keys, want + want_keys):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counter.frame_count >= 1  # it was compiled
    assert not any("forward" in vars(layer) for layer in lm.model.model.layers)  # the layers' own forward again
    frames = counter.frame_count
    _prefills(lm, compiled=True, packed=packed, lengths=(7, 15, 10, 14))
    assert counter.frame_count == frames  # other lengths, same graphs


def test_the_layers_share_their_compiled_graphs(tiny_lm, counter):
    """A model twice as deep compiles exactly as many frames: nothing is compiled once per layer."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    settings = tiny_lm.config.to_dict()
    settings.update(num_hidden_layers=2 * tiny_lm.num_layers, layer_types=2 * settings["layer_types"])
    config = type(tiny_lm.config).from_dict(settings)
    torch.manual_seed(0)
    deep = dataclasses.replace(tiny_lm, model=AutoModelForCausalLM.from_config(config).eval().requires_grad_(False),
                               static_steps=type(tiny_lm.static_steps)(), kv_storage=None)
    assert deep.num_layers == 2 * tiny_lm.num_layers
    counts = []
    for lm in (tiny_lm, deep):
        torch._dynamo.reset()
        compiled_prefill._COMPILED.clear()
        start = counter.frame_count
        got, _ = _prefills(lm, compiled=True)
        counts.append(counter.frame_count - start)
        want, _ = _prefills(lm, compiled=False)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counts[0] == counts[1] >= 1


def test_a_hooked_model_prefills_eagerly(tiny_lm, counter):
    """Hooks (capture's prefill probes) see every prefill; the compiled forward is not used meanwhile."""
    calls = []
    handle = tiny_lm.model.model.layers[1].self_attn.register_forward_hook(lambda *args: calls.append(1))
    try:
        got, _ = _prefills(tiny_lm, compiled=True)
    finally:
        handle.remove()
    assert len(calls) == len(LENGTHS)
    assert counter.frame_count == 0
    want, _ = _prefills(tiny_lm, compiled=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_head_that_does_more_than_the_output_embedding_prefills_eagerly(tiny_lm, counter, monkeypatch):
    monkeypatch.setattr(tiny_lm.model.config, "final_logit_softcapping", 30.0, raising=False)
    assert compiled_prefill.plain_head(tiny_lm.model) is None
    shared = SharedCache(tiny_lm, 1, capacity=16, compiled=True)
    ids = torch.arange(5)[None]
    embeds = tiny_lm.model.get_input_embeddings()(ids)
    shared.extend(embeds, torch.ones(1, 5, dtype=torch.bool), ids, SegmentKey("judger", "prompt"), logits=True)
    assert counter.frame_count == 0


@pytest.mark.parametrize("batch, chunked", [(2, True), (5, False)])
def test_graphed_chunks_take_small_batches_and_the_compiled_forward_the_rest(tiny_lm, counter, monkeypatch,
                                                                              batch, chunked):
    """Both asked for: batches of at most `graph_prefill.BATCH_LIMIT` rows prefill in chunks, larger ones
    through the compiled layers; the results are the eager ones either way."""
    from latentmas import graph_prefill

    chunks = []
    monkeypatch.setattr(graph_prefill, "prefill", _counting(graph_prefill.prefill, chunks))
    shared = SharedCache(tiny_lm, batch, capacity=sum(LENGTHS) + 8, compiled=True, graphed=True)
    generator = torch.Generator().manual_seed(3)
    got = []
    for index, n in enumerate(LENGTHS):
        ids = torch.randint(0, 100, (batch, n), generator=generator)
        embeds = tiny_lm.model.get_input_embeddings()(ids)
        got.append(shared.extend(embeds, torch.ones(batch, n, dtype=torch.bool), ids, SegmentKey(f"a{index}", "prompt")))
    ran_chunks = [hidden is not None for hidden in chunks]
    assert ran_chunks == [chunked] * len(LENGTHS)
    assert (counter.frame_count == 0) == chunked
    want = SharedCache(tiny_lm, batch, capacity=sum(LENGTHS) + 8)
    generator = torch.Generator().manual_seed(3)
    for index, n in enumerate(LENGTHS):
        ids = torch.randint(0, 100, (batch, n), generator=generator)
        embeds = tiny_lm.model.get_input_embeddings()(ids)
        expected = want.extend(embeds, torch.ones(batch, n, dtype=torch.bool), ids, SegmentKey(f"a{index}", "prompt"))
        torch.testing.assert_close(got[index], expected, rtol=1e-5, atol=1e-5)


def _counting(function, results: list):
    def counted(*args, **kwargs):
        results.append(function(*args, **kwargs))
        return results[-1]

    return counted
