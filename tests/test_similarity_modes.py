"""Similarity modes `query` and `attention`: the maths, the prefill hooks, batches, kNN, end to end.

The references here never go through `capture.hooks`: attention weights come from the model
itself (`attn_implementation="eager"`, `output_attentions=True`) and queries are rebuilt from
`output_hidden_states=True` with the layer's own modules, on a copy of the shared cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captures import solve_and_capture, tiny_config
from click.testing import CliRunner
from similarity_cases import naive_attention, naive_query, random_case

from capture.format import CaptureReader
from capture.recorder import CaptureRecorder
from latentmas.app.cli import capture_command
from latentmas.app.recording import open_recorder
from latentmas.knn import KnnFilter
from latentmas.methods.common import encode
from latentmas.prefill import PrefillProbe, score_prompt
from latentmas.prompts import agent_prompt
from latentmas.realign import LatentInput
from latentmas.shared_cache import LATENT, SegmentKey, SharedCache
from latentmas.similarity import maths as similarity
from latentmas.similarity import mode_names
from latentmas.similarity.maths import attention_received, query_similarities
from latentmas.tasks import get_task

TASK = get_task("gsm8k")
TRANSITIONS = ("planner_to_critic", "critic_to_refiner", "refiner_to_judger")


@pytest.fixture(scope="module")
def eager_lm(tiny_lm_cache_env):
    from latentmas.models import load_model

    return load_model("tiny-qwen3", "cpu", attn_implementation="eager")


def tiny_other(tiny_lm, family: str):
    """A random-weight Llama or Qwen2 (no q_norm; Qwen2 has a q_proj bias) of tiny-qwen3's shapes,
    with its tokenizer, in eager attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from latentmas.models import LoadedModel
    from latentmas.models.tiny_qwen3 import sharpen_attention, vary_constant_weights

    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tiny_lm.tokenizer), max_position_embeddings=4096,
                  tie_word_embeddings=False)
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**shapes)
    config._attn_implementation = "eager"
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # no weight left at a constant (Qwen2's q/k/v biases included) and attention far from uniform
    # (about 0.2 in total variation, like tiny-qwen3's 0.33; at the initial scale it is 0.009), so
    # a missing bias, norm or RoPE shows
    vary_constant_weights(model, 7)
    sharpen_attention(model, 6.0)
    assert not hasattr(model.model.layers[0].self_attn, "q_norm")
    return LoadedModel(name=f"tiny-{family}", model=model, tokenizer=tiny_lm.tokenizer, device=torch.device("cpu"))


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen2"])
def any_eager_lm(request, eager_lm, tiny_lm):
    return eager_lm if request.param == "qwen3" else tiny_other(tiny_lm, request.param)


# --------------------------------------------------------------------------- the maths, on random tensors


def test_modes_are_listed_everywhere():
    assert mode_names()[:3] == ("seed", "query", "attention")


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_query_similarities_match_a_plain_loop(heads, kv_heads):
    queries, keys, prompt_mask, kv_mask = random_case(heads=heads, kv_heads=kv_heads)
    T = kv_mask.shape[1]
    got = query_similarities(queries, keys[:, :, :T], prompt_mask, kv_mask)
    want = naive_query(queries, keys[:, :, :T], prompt_mask)
    assert got.shape == (3, T) and got.dtype == torch.float32
    torch.testing.assert_close(got[kv_mask], want[kv_mask], atol=1e-5, rtol=0)
    assert (got[~kv_mask] == 0).all()
    assert got.abs().max() <= 1 + 1e-6
    # padding tokens do not count: changing them changes nothing
    noisy = queries.clone()
    noisy.transpose(1, 2)[~prompt_mask] = 1e3
    torch.testing.assert_close(query_similarities(noisy, keys[:, :, :T], prompt_mask, kv_mask), got)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("chunked", [False, True])
def test_attention_received_matches_a_plain_loop(heads, kv_heads, chunked, monkeypatch):
    if chunked:  # one kv head per block
        monkeypatch.setattr(similarity, "ATTENTION_CHUNK_ELEMENTS", 1)
    queries, keys, prompt_mask, kv_mask = random_case(heads=heads, kv_heads=kv_heads, seed=heads + kv_heads)
    got = attention_received(queries, keys, prompt_mask, kv_mask, scaling=0.35)
    want = naive_attention(queries, keys, prompt_mask, kv_mask, 0.35)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (got[~kv_mask] == 0).all()  # padding columns get nothing
    assert (got >= 0).all() and (got.sum(1) <= 1 + 1e-6).all()
    assert not torch.isnan(got).any()


def test_attention_received_sums_to_one_without_a_prompt_share():
    """With a one-token prompt, the cache receives exactly 1 minus the token's attention to itself."""
    queries, keys, prompt_mask, kv_mask = random_case(batch=1, n=1, T=6)
    got = attention_received(queries, keys, prompt_mask, kv_mask, scaling=1.0)
    torch.testing.assert_close(got.sum(), torch.tensor(1.0) - _self_share(queries, keys, 1.0))


def _self_share(queries, keys, scaling):
    heads, group = queries.shape[1], queries.shape[1] // keys.shape[1]
    shares = [torch.softmax(keys[0, h // group] @ queries[0, h, 0] * scaling, 0)[-1] for h in range(heads)]
    return torch.stack(shares).mean()


def test_shape_errors():
    queries, keys, prompt_mask, kv_mask = random_case()
    with pytest.raises(ValueError, match="kv_mask"):
        attention_received(queries, keys, prompt_mask, kv_mask[:, 1:], 1.0)
    with pytest.raises(ValueError, match="prompt_mask"):
        query_similarities(queries, keys, prompt_mask[:, 1:])
    with pytest.raises(ValueError, match="do not fit"):
        query_similarities(queries[:, :3], keys, prompt_mask)
    with pytest.raises(ValueError, match="from a prefill, not 'seed'"):  # a hand-off mode has no prefill to read
        PrefillProbe(None, prompt_mask, "seed")


# --------------------------------------------------------------------------- against the model itself


def filled_cache(lm, problems, latent_steps=3, trim=False):
    """The planner's prompts (left-padded batch) and latent steps on a SharedCache; `trim` drops
    random columns (kNN-like gaps and uneven padding)."""
    prompts = [agent_prompt("planner", p.question, TASK.answer_instruction) for p in problems]
    _, ids, mask = encode(lm, prompts, False)
    shared = SharedCache(lm, len(problems))
    embed = lm.model.get_input_embeddings()
    hidden = shared.extend(embed(ids), mask, ids, SegmentKey("planner", "prompt"))
    latent = LatentInput(lm, False)
    ones = torch.ones(len(problems), 1, dtype=torch.bool)
    for _ in range(latent_steps):
        hidden = shared.extend(latent(hidden)[:, None], ones, torch.full((len(problems), 1), LATENT),
                               SegmentKey("planner", "latent"))
    if trim:
        keep = torch.rand(shared.mask.shape, generator=torch.Generator().manual_seed(1)) < 0.6
        keep[:, -1] = True
        shared.keep(keep)
    return shared


def critic_prompt(lm, problems):
    prompts = [agent_prompt("critic", p.question, TASK.answer_instruction) for p in problems]
    _, ids, mask = encode(lm, prompts, False)
    return ids, mask


def reference_forward(lm, shared, ids, mask, **outputs):
    """The critic's prefill straight through the model, on a copy of the cache (same inputs as
    `SharedCache.extend` gives it). Returns (model output, position ids)."""
    positions = (shared.next_position[:, None] + mask.long().cumsum(1) - 1).masked_fill(~mask, 0)
    cache = copy.deepcopy(shared.cache)
    out = lm.model.base_model(
        inputs_embeds=lm.model.get_input_embeddings()(ids),
        attention_mask=torch.cat([shared.mask, mask], dim=1).long(),
        position_ids=positions, use_cache=True, **{shared._cache_kwarg: cache}, **outputs)
    return out, positions


def probed_prefill(lm, shared, ids, mask, mode):
    """What the hooks compute during the critic's real prefill: [batch, num_layers, T]."""
    probe = PrefillProbe(shared, mask, mode)
    with probe:
        shared.extend(lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("critic", "prompt"))
    return probe.result()


def mean_over_real_tokens(per_token, mask):
    """[batch, n, T] -> [batch, T], averaged over each row's real tokens."""
    weights = mask.float() / mask.float().sum(1, keepdim=True)
    return torch.einsum("bnt,bn->bt", per_token, weights)


@pytest.mark.parametrize("trim", [False, True], ids=["full", "trimmed"])
def test_attention_matches_the_models_own_weights(any_eager_lm, fake_problems, trim):
    lm = any_eager_lm
    assert lm.model.config._attn_implementation == "eager"
    problems = fake_problems()  # three lengths: the batch is left-padded
    shared = filled_cache(lm, problems, trim=trim)
    ids, mask = critic_prompt(lm, problems)
    assert not mask.all(), "the critic prompts should be padded"
    T, kv_mask = shared.length, shared.mask.clone()
    out, _ = reference_forward(lm, shared, ids, mask, output_attentions=True)
    got = probed_prefill(lm, shared, ids, mask, "attention")
    assert got.shape == (len(problems), lm.num_layers, T)
    for layer, weights in enumerate(out.attentions):  # [batch, heads, n, T + n]
        assert weights.shape[-1] == T + ids.shape[1]
        want = mean_over_real_tokens(weights[..., :T].mean(dim=1), mask)
        torch.testing.assert_close(got[:, layer], want, atol=1e-4, rtol=0, msg=f"layer {layer}")
        assert (want[~kv_mask] == 0).all()
    assert (got[:, :, ~kv_mask.any(0)] == 0).all()
    for b in range(len(problems)):
        assert (got[b][:, ~kv_mask[b]] == 0).all()  # padding columns get no attention
    assert (got >= 0).all() and (got.sum(-1) <= 1 + 1e-5).all()
    assert got.sum(-1).min() > 0.01  # the cache really is read


@pytest.mark.parametrize("trim", [False, True], ids=["full", "trimmed"])
def test_query_matches_a_recomputation_from_hidden_states(any_eager_lm, fake_problems, trim):
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    lm = any_eager_lm
    problems = fake_problems()
    shared = filled_cache(lm, problems, trim=trim)
    ids, mask = critic_prompt(lm, problems)
    T, kv_mask = shared.length, shared.mask.clone()
    keys = [k.clone() for k in shared.layer_keys()]  # [batch, kv, T, D], the cache at the hand-off
    out, positions = reference_forward(lm, shared, ids, mask, output_hidden_states=True)
    got = probed_prefill(lm, shared, ids, mask, "query")
    assert got.shape == (len(problems), lm.num_layers, T)
    decoder = lm.model.base_model
    heads, head_dim = lm.num_heads, lm.head_dim
    group = heads // lm.num_kv_heads
    batch, n = ids.shape
    for layer_index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        hidden = layer.input_layernorm(out.hidden_states[layer_index])  # the state entering the layer
        q = attn.q_proj(hidden).view(batch, n, heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3; Llama and Qwen2 have none
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = decoder.rotary_emb(hidden, positions)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)  # [batch, heads, n, D]
        k = keys[layer_index].repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        cosines = F.cosine_similarity(q[:, :, :, None, :], k[:, :, None, :, :], dim=-1, eps=1e-12)
        want = mean_over_real_tokens(cosines.mean(dim=1), mask)  # [batch, T]
        # padding columns of the cache are 0 by definition; the real ones must match
        torch.testing.assert_close(got[:, layer_index][kv_mask], want[kv_mask], atol=1e-5, rtol=0,
                                   msg=f"layer {layer_index}")
        assert (got[:, layer_index][~kv_mask] == 0).all()
    assert got.abs().max() <= 1 + 1e-6
    assert got[:, :, :][kv_mask[:, None, :].expand_as(got)].std() > 0.01


@pytest.mark.parametrize("mode", ["query", "attention"])
@pytest.mark.parametrize("variant", ["layer by layer", "recomputed queries"])
def test_probe_variants_agree(tiny_lm, fake_problems, monkeypatch, mode, variant):
    """Layers reduced one at a time, or queries rebuilt from hidden_states (when the query
    projection's own hook cannot fire), give what the default grouped reduction gives."""
    from latentmas import prefill as hooks

    lm = tiny_lm
    problems = fake_problems()
    ids, mask = critic_prompt(lm, problems)
    grouped = probed_prefill(lm, filled_cache(lm, problems, trim=True), ids, mask, mode)
    if variant == "layer by layer":
        monkeypatch.setattr(hooks, "LAYER_CHUNK_ELEMENTS", 1)
    else:
        monkeypatch.setattr(hooks, "query_source", lambda module: torch.nn.Identity())
    other = probed_prefill(lm, filled_cache(lm, problems, trim=True), ids, mask, mode)
    torch.testing.assert_close(other, grouped, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- kNN scoring pass


@pytest.mark.parametrize("mode", ["query", "attention"])
def test_scoring_pass_restores_the_cache_and_matches_the_prefill(tiny_lm, fake_problems, mode):
    lm = tiny_lm
    problems = fake_problems()
    shared = filled_cache(lm, problems, trim=True)
    ids, mask = critic_prompt(lm, problems)
    before = {name: getattr(shared, name).clone() for name in ("mask", "positions", "token_ids", "segment_ids",
                                                                "next_position")}
    keys = [(layer.keys, layer.values) for layer in shared.cache.layers]
    contents = [(k.clone(), v.clone()) for k, v in keys]
    segments = list(shared.segments)
    middle = lm.num_layers // 2
    embeds = lm.model.get_input_embeddings()(ids)
    scores = score_prompt(shared, embeds, mask, ids, SegmentKey("critic", "prompt"), mode, middle)
    for name, value in before.items():
        assert torch.equal(getattr(shared, name), value), name
    assert shared.segments == segments
    for layer, (k, v), (k_was, v_was) in zip(shared.cache.layers, keys, contents):
        assert layer.keys.shape == k.shape and layer.values.shape == v.shape
        assert torch.equal(layer.keys, k_was) and torch.equal(layer.values, v_was)
    assert shared.cache.get_seq_length() == shared.length
    full = probed_prefill(lm, shared, ids, mask, mode)
    torch.testing.assert_close(scores, full[:, middle], atol=1e-6, rtol=0)


@pytest.mark.parametrize("score", ["query", "attention"])
def test_knn_ranks_by_the_chosen_score(tiny_lm, fake_problems, tmp_path, score):
    """After the planner, the kNN keeps exactly what keep_mask picks from the middle layer of the
    planner_to_critic matrix an untrimmed capture in that mode records."""
    problems = fake_problems()[:2]
    plain = capture(tiny_lm, problems, tiny_config(similarity=score, max_new_tokens=1), tmp_path / "plain.h5", 2)
    knn_cfg = tiny_config(similarity=score, max_new_tokens=1, knn_filter=True, knn_percentage=0.4, knn_min_keep=3,
                     knn_score=score)
    trimmed = capture(tiny_lm, problems, knn_cfg, tmp_path / "knn.h5", 2)
    middle = tiny_lm.num_layers // 2
    knn = KnnFilter(0.4, 3, "top", score)
    for number in (1, 2):
        before = plain[number]["planner_to_critic"]
        scores = torch.from_numpy(before.layer_similarities[middle].astype(np.float32))[None]
        keep = knn.keep_mask(scores, torch.ones_like(scores, dtype=torch.bool))[0].numpy()
        np.testing.assert_array_equal(trimmed[number]["planner_to_critic"].positions, before.positions[keep])
    # and a different score keeps different columns
    seed = capture(tiny_lm, problems, tiny_config(max_new_tokens=1, knn_filter=True, knn_percentage=0.4,
                                             knn_min_keep=3), tmp_path / "seed.h5", 2)
    assert any(not np.array_equal(seed[n]["planner_to_critic"].positions,
                                  trimmed[n]["planner_to_critic"].positions) for n in (1, 2))


def test_knn_score_is_part_of_the_identity():
    assert tiny_config(knn_filter=True).identity()["knn"] == {"percentage": 0.8, "min_keep": 5, "strategy": "top"}
    assert tiny_config(knn_filter=True, knn_score="attention").identity()["knn"]["score"] == "attention"
    assert tiny_config(knn_score="attention").identity()["knn"] is None
    with pytest.raises(ValueError, match="knn score"):
        KnnFilter(score="cosine")


# --------------------------------------------------------------------------- capture: batches, recorder


def capture(lm, problems, cfg, path, batch_size):
    """Capture `problems` in batches; returns {number: {handoff name: Handoff}}."""
    solve_and_capture(lm, problems, cfg, path, batch_size, transitions=TRANSITIONS, capture_dtype="float32")
    with CaptureReader(path) as reader:
        assert reader.attrs["similarity"] == cfg.similarity
        return {n: {h.name: h for h in reader.handoffs(n)} for n in reader.problem_numbers}


@pytest.mark.slow
@pytest.mark.parametrize("mode, knn_score", [("query", None), ("attention", None), ("attention", "attention"),
                                             ("query", "query")])
def test_batches_with_padding_match_one_by_one(tiny_lm, fake_problems, tmp_path, mode, knn_score):
    problems = fake_problems()
    knn = dict(knn_filter=True, knn_percentage=0.5, knn_min_keep=3, knn_score=knn_score) if knn_score else {}
    cfg = tiny_config(similarity=mode, generate_bs=3, **knn)
    batched = capture(tiny_lm, problems, cfg, tmp_path / "batched.h5", 3)
    single = capture(tiny_lm, problems, cfg, tmp_path / "single.h5", 1)
    widths = {len(batched[n]["planner_to_critic"].positions) for n in (1, 2, 3)}
    assert len(widths) == 3, "rows should be padded differently"
    for number in (1, 2, 3):
        assert list(batched[number]) == list(TRANSITIONS)
        for name in TRANSITIONS:
            b, s = batched[number][name], single[number][name]
            np.testing.assert_array_equal(b.positions, s.positions)
            assert b.tokens == s.tokens
            np.testing.assert_allclose(b.layer_similarities, s.layer_similarities, atol=1e-5, rtol=0,
                                       err_msg=f"problem {number} {name}")


def test_recorder_needs_the_prefill(tiny_lm, fake_problems, tmp_path):
    """An observer driver that never calls watch_prefill gets a clear error, not a silent seed matrix."""
    from latentmas.methods.latent_mas import HandoffEvent

    lm = tiny_lm
    problems = fake_problems()[:1]
    shared = filled_cache(lm, problems)
    ids, mask = critic_prompt(lm, problems)
    recorder = open_recorder(tmp_path / "x.h5", tiny_config(similarity="query"), lm, overwrite=True)
    recorder.on_handoff(HandoffEvent("planner", "critic", shared, torch.zeros(1, lm.hidden_size), ids, mask,
                                     problems))
    with pytest.raises(RuntimeError, match="never watched"):
        recorder.write_batch([])
    recorder.close()
    with pytest.raises(ValueError, match="similarity mode"):
        CaptureRecorder(None, lm, "cosine")


def test_probe_refuses_other_forward_passes(tiny_lm, fake_problems):
    lm = tiny_lm
    problems = fake_problems()[:2]
    shared = filled_cache(lm, problems)
    ids, mask = critic_prompt(lm, problems)
    probe = PrefillProbe(shared, mask, "attention")
    with pytest.raises(RuntimeError, match="prefill"), probe:
        shared.extend(lm.model.get_input_embeddings()(ids[:, :3]), mask[:, :3], ids[:, :3],
                      SegmentKey("critic", "prompt"))
    assert not any(layer.self_attn._forward_hooks for layer in lm.model.base_model.layers)
    with pytest.raises(RuntimeError, match="never reached"):
        PrefillProbe(shared, mask, "query").result()
    with pytest.raises(ValueError, match="not 'seed'"):
        PrefillProbe(shared, mask, "seed")


# --------------------------------------------------------------------------- end to end


def cli_capture(workdir, *extra):
    path = workdir / "run.h5"
    args = ["--model_name", "tiny-qwen3", "--device", "cpu", "--max_samples", "2", "--max_new_tokens", "8",
            "--latent_steps", "2", "--output_dir", str(workdir / "runs"), "--capture_file", str(path),
            "--overwrite", *extra]
    result = CliRunner().invoke(capture_command, args)
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["query", "attention"])
def test_capture_command_writes_the_mode(workdir, tiny_lm, mode):
    path = cli_capture(workdir, "--similarity", mode, "--capture_dtype", "float32")
    with CaptureReader(path) as reader:
        assert reader.attrs["similarity"] == mode
        assert reader.problem_numbers == [1, 2]
        for number in reader.problem_numbers:
            handoffs = list(reader.handoffs(number))
            assert [h.name for h in handoffs] == list(TRANSITIONS)
            widths = [h.num_columns for h in handoffs]
            assert widths == sorted(widths) and len(set(widths)) == 3  # each agent adds columns
            for handoff in handoffs:
                sims = handoff.layer_similarities
                assert sims.shape == (tiny_lm.num_layers, len(handoff.positions))
                assert np.isfinite(sims).all()
                if mode == "query":
                    assert np.abs(sims).max() <= 1 + 1e-5 and sims.std() > 0
                else:
                    assert sims.min() >= 0 and sims.max() <= 1
                    assert (sims.sum(axis=1) <= 1 + 1e-4).all() and (sims.sum(axis=1) > 0).all()


@pytest.mark.slow
def test_capture_command_knn_with_attention_score(workdir, tiny_lm):
    path = cli_capture(workdir, "--knn_filter", "--knn_score", "attention", "--knn_percentage", "0.5",
                       "--similarity", "attention")
    with CaptureReader(path) as reader:
        assert reader.attrs["knn_score"] == "attention"
        assert reader.config["knn"]["score"] == "attention"
        for number in reader.problem_numbers:
            first = next(reader.handoffs(number))
            assert np.any(np.diff(first.positions) > 1), "kNN should leave gaps"


# --------------------------------------------------------------------------- `fused` (torch.compile on CUDA)


@pytest.fixture
def compile_on_cpu(monkeypatch):
    """`fused` compiles on CPU too, with `backend` ("eager": Dynamo traces, no code generation, so no
    compiler is needed). Returns a setter for the backend."""
    import functools

    real_compile = torch.compile
    monkeypatch.setattr(similarity, "FUSED_DEVICE_TYPES", ("cpu",))

    def use(backend):
        monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend=backend))

    use("eager")
    return use


@pytest.mark.parametrize("batch, n, T, sliced", [(2, 7, 30, False), (3, 11, 41, True), (1, 5, 9, False)])
def test_fused_query_reduction_traces_and_matches_eager(compile_on_cpu, batch, n, T, sliced):
    """Dynamo traces the whole `query` reduction, the model's own RoPE included, and gives what the
    eager maths gives, for several batch sizes, prompt lengths and key layouts."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb as rope

    from latentmas.similarity.query import rotated, rotated_query_similarities

    _, keys, prompt_mask, kv_mask = random_case(batch=batch, heads=4, kv_heads=2, n=n, T=T, D=8)
    if sliced:  # a view into a wider buffer, as a static cache would hold it
        keys = torch.cat([keys, torch.randn(batch, 2, 3, 8)], dim=2)[:, :, :T + n]
    g = torch.Generator().manual_seed(n)
    queries = torch.randn(batch, n, 4, 8, generator=g)
    angles = torch.rand(batch, n, 4, generator=g) * n
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    fused_fn = similarity.fused(rotated_query_similarities.__wrapped__)
    got = fused_fn(queries, cos, sin, prompt_mask, keys, kv_mask, rope)
    want = query_similarities(rotated(queries, cos, sin, rope), keys[:, :, :T], prompt_mask, kv_mask)
    assert fused_fn.compiled_calls == 1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_fused_falls_back_to_eager_once_with_the_compilers_reason(compile_on_cpu):
    """A failing compiler (no Triton, no C compiler) costs one one-line warning, then `fn` runs eager."""
    import warnings

    def broken_backend(graph, example_inputs):
        raise RuntimeError("Cannot find a working triton installation\nsee the docs")

    compile_on_cpu(broken_backend)

    @similarity.fused
    def double(x):
        return x * 2

    with pytest.warns(UserWarning, match=r"^torch.compile of double failed \(RuntimeError: Cannot find a working "
                                         r"triton installation\); running it eager$"):
        assert double(torch.ones(2)).tolist() == [2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        assert double(torch.ones(3)).tolist() == [2, 2, 2]
    assert double.compiled_calls == 0


def test_fused_lets_input_errors_through_and_keeps_compiling(compile_on_cpu):
    import warnings

    @similarity.fused
    def add(x, y):
        return x + y

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not mistaken for a broken compiler
        with pytest.raises(RuntimeError, match="size of tensor"):
            add(torch.ones(3), torch.ones(4))
    assert add(torch.ones(2), torch.ones(2)).tolist() == [2, 2] and add.compiled_calls == 1


def test_fused_runs_eager_on_other_devices(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: pytest.fail("compiled"))
    double = similarity.fused(lambda x: x * 2)
    assert double(torch.ones(1)).tolist() == [2]  # CPU, not in FUSED_DEVICE_TYPES
    assert double.compiled_calls == 0
