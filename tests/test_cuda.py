"""The CUDA-only paths: graph-replayed steps, their reuse, and capture's asynchronous host copies.

Skipped without a GPU (CI has none); run them on one with `pytest tests/test_cuda.py`.
The model is tiny-qwen3 in fp32, so the graph and eager paths agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from captures import StageAtTheEnd, assert_same_handoffs, solve_and_capture

from capture.format import CaptureReader
from capture.recorder import CaptureRecorder
from latentmas.config import RunConfig
from latentmas.prompts import AGENTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_lm(tiny_lm_cache_env):
    from latentmas.models import load_model

    lm = load_model("tiny-qwen3", "cuda")
    lm.model.float()
    return lm


def _capture(lm, problems, path, batch_size, **settings):
    settings.setdefault("temperature", 0.0)
    cfg = RunConfig(model_name="tiny-qwen3", device="cuda", latent_steps=4, max_new_tokens=24, **settings)
    return [r.output for r in solve_and_capture(lm, problems, cfg, path, batch_size)]


@pytest.mark.parametrize("compiled, temperature", [(False, 0.0), (False, 0.8), (True, 0.0), (True, 0.8)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_graph_steps_decode_what_the_plain_loop_decodes(cuda_lm, fake_problems, tmp_path, batch_size, compiled,
                                                        temperature):
    """Graph-replayed steps (the split-KV kernel's attention; sampling inside the graph) decode what the
    plain loop (SDPA, sampling outside) decodes."""
    from latentmas.step_attention import use_kernel

    problems = fake_problems()
    plain = _capture(cuda_lm, problems, tmp_path / "plain.h5", batch_size, fast_decode=False,
                     temperature=temperature)
    cuda_lm.static_steps.clear()
    fast = _capture(cuda_lm, problems, tmp_path / "fast.h5", batch_size, fast_decode=True, compile_step=compiled,
                    temperature=temperature)
    assert fast == plain
    assert use_kernel(cuda_lm.device)
    steps = [step for key, step in cuda_lm.static_steps.items() if key[0] != "prefill"]
    assert all(step.graph is not None and step.compiled == compiled for step in steps)
    assert any(step.sampling is not None for step in steps)
    assert any(key[0] == "prefill" for key in cuda_lm.static_steps)  # the prompts went through chunks
    assert_same_handoffs(tmp_path / "plain.h5", tmp_path / "fast.h5", atol=2e-3)


def test_reused_graphs_forget_earlier_problems(cuda_lm, fake_problems, tmp_path):
    problems = fake_problems()
    cuda_lm.static_steps.clear()
    fresh = _capture(cuda_lm, problems[1:2], tmp_path / "fresh.h5", 1, fast_decode=True)
    _capture(cuda_lm, problems[2:3], tmp_path / "longer.h5", 1, fast_decode=True)  # leaves its columns behind
    again = _capture(cuda_lm, problems[1:2], tmp_path / "again.h5", 1, fast_decode=True)
    assert again == fresh
    assert_same_handoffs(tmp_path / "fresh.h5", tmp_path / "again.h5")


def test_capture_written_while_decoding_equals_written_after(cuda_lm, fake_problems, tmp_path):
    """The asynchronous pinned copies hold what the device computed."""
    problems = fake_problems()
    cfg = RunConfig(model_name="tiny-qwen3", device="cuda", latent_steps=4, max_new_tokens=40, temperature=0.0)
    for name, recorder_class in (("during", CaptureRecorder), ("after", StageAtTheEnd)):
        solve_and_capture(cuda_lm, problems, cfg, tmp_path / f"{name}.h5", len(problems), recorder_class)
    assert_same_handoffs(tmp_path / "during.h5", tmp_path / "after.h5")


@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (4, 4)])
def test_bf16_similarities_match_fp64_loops(heads, kv_heads):
    """The half-precision paths (fp32 products of bf16 inputs via `fp32_bmm`, fp32 norms) on CUDA."""
    from similarity_cases import naive_attention, naive_query, random_case

    from latentmas.similarity.maths import attention_received, query_similarities

    queries, keys, prompt_mask, kv_mask = random_case(heads=heads, kv_heads=kv_heads, n=9, T=40, D=64)
    queries, keys = queries.bfloat16(), keys.bfloat16()  # the fp64 loops see exactly these values
    T = kv_mask.shape[1]
    cuda = [t.cuda() for t in (queries, keys, prompt_mask, kv_mask)]
    got = attention_received(*cuda, scaling=0.125).cpu()
    torch.testing.assert_close(got, naive_attention(queries.float(), keys.float(), prompt_mask, kv_mask, 0.125),
                               atol=1e-6, rtol=1e-4)
    got = query_similarities(cuda[0], cuda[1][:, :, :T], cuda[2], cuda[3]).cpu()
    want = naive_query(queries.float(), keys[:, :, :T].float(), prompt_mask)
    torch.testing.assert_close(got[kv_mask], want[kv_mask], atol=1e-5, rtol=0)


def _rope_fp64(queries, cos, sin):
    """[B, n, H, D] queries rotated as RoPE does (rotate_half form), in fp64 -> [B, H, n, D]."""
    q, cos, sin = queries.double().transpose(1, 2), cos.double()[:, None], sin.double()[:, None]
    half = q.shape[-1] // 2
    return q * cos + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("batch, n, T, sliced", [(1, 7, 30, False), (3, 11, 41, True), (16, 5, 9, False)])
def test_fused_query_similarities_match_fp64(batch, n, T, sliced, monkeypatch):
    """The torch.compile'd query reduction (RoPE, norms, products) on bf16 CUDA inputs, against fp64
    loops and against its own eager run."""
    from similarity_cases import naive_query
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb as rope

    from latentmas.similarity import maths as similarity
    from latentmas.similarity.query import rotated_query_similarities

    g = torch.Generator().manual_seed(batch)
    queries = torch.randn(batch, n, 8, 64, generator=g).bfloat16()
    keys = (torch.randn(batch, 2, T + n + 3, 64, generator=g) + 0.3 * torch.randn(64, generator=g)).bfloat16()
    keys = keys[:, :, :T + n] if sliced else keys[:, :, :T + n].contiguous()  # the cache after the prefill
    prompt_mask = torch.ones(batch, n, dtype=torch.bool)
    kv_mask = torch.ones(batch, T, dtype=torch.bool)
    for b in range(batch):  # left padding, different per row, never a whole row
        prompt_mask[b, :b % n] = False
        kv_mask[b, :(2 * b) % T] = False
    angles = torch.rand(batch, n, 32, generator=g) * n
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    want = naive_query(_rope_fp64(queries, cos, sin), keys[:, :, :T].double(), prompt_mask)
    args = [t.cuda() for t in (queries, cos, sin, prompt_mask, keys, kv_mask)] + [rope]
    compiled_before = rotated_query_similarities.compiled_calls
    fused = rotated_query_similarities(*args).cpu()
    assert rotated_query_similarities.compiled_calls == compiled_before + 1
    monkeypatch.setattr(similarity, "FUSED_DEVICE_TYPES", ())
    eager = rotated_query_similarities(*args).cpu()
    assert fused.shape == (batch, T) and fused.dtype == torch.float32
    assert (fused[~kv_mask] == 0).all()
    torch.testing.assert_close(fused[kv_mask], want[kv_mask], atol=1e-3, rtol=0)
    torch.testing.assert_close(eager[kv_mask], want[kv_mask], atol=2e-3, rtol=0)  # rotated queries rounded to bf16


def test_fused_query_capture_equals_eager(cuda_lm, fake_problems, tmp_path, monkeypatch):
    """A `query` capture with the compiled reduction is the eager one (fp32 model)."""
    from latentmas.similarity import maths as similarity
    from latentmas.similarity.query import rotated_query_similarities

    problems = fake_problems()
    cfg = RunConfig(model_name="tiny-qwen3", device="cuda", latent_steps=4, max_new_tokens=24, temperature=0.0,
                    similarity="query")
    compiled_before = rotated_query_similarities.compiled_calls
    solve_and_capture(cuda_lm, problems, cfg, tmp_path / "fused.h5", 3, capture_dtype="float32")
    assert rotated_query_similarities.compiled_calls > compiled_before
    monkeypatch.setattr(similarity, "FUSED_DEVICE_TYPES", ())
    solve_and_capture(cuda_lm, problems, cfg, tmp_path / "eager.h5", 3, capture_dtype="float32")
    assert_same_handoffs(tmp_path / "fused.h5", tmp_path / "eager.h5", atol=1e-5)


def test_graph_steps_never_read_what_an_earlier_batch_left(cuda_lm, fake_problems, tmp_path):
    """With the split-KV kernel the slots past a cache are not cleared: NaN left there changes nothing."""
    import gc

    problems = fake_problems()[:2]
    cuda_lm.static_steps.clear()
    fresh = _capture(cuda_lm, problems, tmp_path / "fresh.h5", 2, fast_decode=True)
    gc.collect()
    for buffer in (*cuda_lm.kv_storage.keys, *cuda_lm.kv_storage.values):
        buffer.fill_(float("nan"))  # the storage the next batch borrows
    again = _capture(cuda_lm, problems, tmp_path / "again.h5", 2, fast_decode=True)
    assert again == fresh


def test_fused_projections_compute_what_separate_ones_compute(cuda_lm, tiny_lm_cache_env):
    """On CUDA models load with q/k/v and gate/up fused (`latentmas.fused_projections`); unfused, the
    same weights give the same logits."""
    from latentmas.fused_projections import GroupMember
    from latentmas.models import load_model

    separate = load_model("tiny-qwen3", "cuda", fuse_projections=False)
    separate.model.float()
    assert isinstance(cuda_lm.model.model.layers[0].self_attn.k_proj, GroupMember)
    assert not isinstance(separate.model.model.layers[0].self_attn.k_proj, GroupMember)
    ids = torch.randint(0, 200, (3, 21), device="cuda")
    with torch.no_grad():
        fused = cuda_lm.model(input_ids=ids).logits
        plain = separate.model(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    assert plain.std() > 0.05


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("grouped, compiled, packed", [(False, True, False), (True, False, False), (True, True, False),
                                                      (True, False, True), (True, True, True)])
def test_inductor_compiled_prefills_compute_what_eager_ones_do(tiny_lm_cache_env, monkeypatch, dtype, atol, grouped,
                                                               compiled, packed):
    """Prompt prefills through inductor-compiled decoder layers (`compiled_prefill`), attending on the
    unrepeated GQA keys (`prefill_attention`) and on their real tokens only (`packed_prefill`), left padding
    and logits included, against eager, padded prefills through transformers' SDPA path on the same cache
    contents (the real columns: a packed prefill leaves zeros in padding slots)."""
    from test_compiled_prefill import _prefills

    from latentmas import shared_cache
    from latentmas.models import load_model

    lm = load_model("tiny-qwen3", "cuda")
    lm.model.to(dtype)
    with torch.no_grad():
        monkeypatch.setattr(shared_cache, "GROUPED_PREFILL", False)
        want, want_keys = _prefills(lm, compiled=False, logits=True, batch=3, packed=False)
        monkeypatch.setattr(shared_cache, "GROUPED_PREFILL", grouped)
        got, got_keys = _prefills(lm, compiled=compiled, logits=True, batch=3, packed=packed)
    for a, b in zip(got + got_keys, want + want_keys):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol)
    assert want[-1].float().std() > 0.05


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_replayed_prefill_chunks_compute_what_eager_prefills_do(tiny_lm_cache_env, monkeypatch, dtype, atol,
                                                                      batch):
    """Prompt prefills as replayed CUDA graphs of chunks (`graph_prefill`; several chunks, a partial last
    one, left padding, logits) against eager prefills."""
    from test_graph_prefill import _prefills

    from latentmas import graph_prefill
    from latentmas.models import load_model

    monkeypatch.setattr(graph_prefill, "LARGEST", 32)
    lm = load_model("tiny-qwen3", "cuda")
    lm.model.to(dtype)
    want, want_cached, want_books, _ = _prefills(lm, graphed=False, batch=batch)
    got, got_cached, got_books, chunks = _prefills(lm, graphed=True, batch=batch)
    assert chunks == [32]
    assert lm.static_steps[("prefill", 32, False)].graph is not None
    for a, b in zip(got_books, want_books):
        assert torch.equal(a, b)
    for a, b in zip(got + got_cached, want + want_cached):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol)
    assert want[-1].float().std() > 0.05


@pytest.mark.parametrize("similarity", ["query", "attention"])
def test_probes_read_graph_replayed_chunks_as_they_read_hooked_prefills(cuda_lm, fake_problems, tmp_path, similarity):
    """`query` and `attention` captures from prefills in graph-replayed chunks, whose graphs copy every
    layer's queries out (`graph_prefill`, watched chunks), equal those of hooked eager prefills."""
    problems = fake_problems()
    plain = _capture(cuda_lm, problems, tmp_path / "plain.h5", 3, fast_decode=False, similarity=similarity)
    cuda_lm.static_steps.clear()
    fast = _capture(cuda_lm, problems, tmp_path / "fast.h5", 3, fast_decode=True, similarity=similarity)
    assert fast == plain
    assert any(key[0] == "prefill" and key[2] and step.graph is not None
               for key, step in cuda_lm.static_steps.items())
    assert_same_handoffs(tmp_path / "plain.h5", tmp_path / "fast.h5", atol=2e-3)


class _NoHostReadsBetweenHandoffs(CaptureRecorder):
    """Turns torch's sync debug mode to "error" from the planner's latent-step readout to the end of
    the judger's hand-off: any call that makes the host wait for the device raises there."""

    watched = 0  # batches watched

    def on_latent_steps(self, event):
        if event.agent == AGENTS[0]:
            torch.cuda.set_sync_debug_mode("error")
            type(self).watched += 1
        super().on_latent_steps(event)

    def on_handoff(self, event):
        try:
            super().on_handoff(event)
        finally:
            if event.to_agent == AGENTS[-1]:
                torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_host_never_waits_for_the_device_between_hand_offs(cuda_lm, fake_problems, tmp_path, batch_size,
                                                              compiled):
    """From the planner's latent steps to the judger's hand-off (readout, seed similarities, prompt
    prefills in graphed chunks, latent steps) nothing reads the device, so the capture's host time
    overlaps the device's. torch's sync debug mode sees what makes the host wait for a result (`item`,
    `tolist`, copies to pageable memory, `nonzero`), not an explicit `synchronize()`. A host read there
    (the thinking agents' prompt token counts once were one) left the device idle while the host queued
    the next ~320 similarity kernels: 4 ms a hand-off at batch size 1 on an H200."""
    cfg = RunConfig(model_name="tiny-qwen3", device="cuda", latent_steps=4, max_new_tokens=4, temperature=0.0,
                    fast_decode=True, compile_step=compiled)
    problems = fake_problems()
    _NoHostReadsBetweenHandoffs.watched = 0
    try:
        solve_and_capture(cuda_lm, problems, cfg, tmp_path / "c.h5", batch_size,
                          recorder_class=_NoHostReadsBetweenHandoffs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert _NoHostReadsBetweenHandoffs.watched == -(-len(problems) // batch_size)
    with CaptureReader(tmp_path / "c.h5") as capture:
        for number in capture.problem_numbers:
            handoffs = list(capture.handoffs(number))
            assert [h.to_agent for h in handoffs] == list(AGENTS[1:])
            assert all(h.readout is not None for h in handoffs)


def test_split_k_batch_one_step_computes_what_the_step_without_it_computes(tiny_lm_cache_env, monkeypatch):
    """In bf16 the compiled batch-1 step runs o_proj and down_proj as split-K partials summed in the next
    fused kernel (`kernels.split_k`), and its logits are those of the compiled step without it, to bf16
    rounding, over the same four tokens."""
    from latentmas import fast_decode
    from latentmas.fast_decode import StaticKV, StaticStep
    from latentmas.kernels import skinny_linear as skinny
    from latentmas.kernels import split_k
    from latentmas.methods.common import encode
    from latentmas.models import load_model
    from latentmas.prompts import agent_prompt
    from latentmas.shared_cache import SegmentKey, SharedCache

    lm = load_model("tiny-qwen3", "cuda")
    assert lm.dtype == torch.bfloat16
    _, ids, mask = encode(lm, [agent_prompt("judger", "What is 2 + 3?", "Answer with a number.")], False)
    shared = SharedCache(lm, 1)
    logits = shared.extend(lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("judger", "prompt"), logits=True)
    shared.reserve(8)
    taken = []

    def spy(x, weight):
        splits = split_k.split_for(x, weight)
        if splits:
            taken.append(splits)
        return splits

    monkeypatch.setattr(skinny, "split_for", spy)
    fed = [logits.argmax(-1)]  # the tokens the step without split-K picks greedily, fed to both
    outputs = {}
    for few in (0, 4):
        monkeypatch.setitem(split_k.SPLITS, "few", few)
        torch._dynamo.reset()
        fast_decode._COMPILED.clear()
        taken.clear()
        step = StaticStep(lm, StaticKV(shared.storage), use_graph=True, compiled=True).start(shared)
        rows = []
        for i in range(4):
            rows.append(step.run(fed[i]).float().clone())
            if not few:
                fed.append(rows[-1].argmax(-1))
        outputs[few] = torch.stack(rows)
        assert bool(taken) == bool(few)
    torch._dynamo.reset()
    fast_decode._COMPILED.clear()
    assert not torch.equal(outputs[0][0], outputs[0][1])  # the steps differ: a check that could fail
    torch.testing.assert_close(outputs[4], outputs[0], atol=3e-2, rtol=3e-2)
