"""The fast decode path (static KV buffer; a CUDA graph on GPUs) decodes what the plain loop decodes."""

from __future__ import annotations

import pytest
import torch
from captures import assert_same_handoffs, solve_and_capture

from capture.selection import DEFAULT_TRANSITIONS as TRANSITIONS
from latentmas import decoding
from latentmas.config import RunConfig
from latentmas.methods import get_method
from latentmas.methods.common import encode
from latentmas.prompts import agent_prompt
from latentmas.shared_cache import SegmentKey, SharedCache
from latentmas.tasks import get_task


def _solve(lm, problems, method, tmp_path, batch_size, **settings):
    cfg = RunConfig(model_name="tiny-qwen3", device="cpu", method=method, latent_steps=3, max_new_tokens=24,
                    **settings)
    path = tmp_path / f"{method}-{settings.get('fast_decode')}-{batch_size}.h5"
    return solve_and_capture(lm, problems, cfg, path if method == "latent_mas" else None, batch_size), path


def _five_columns(lm) -> SharedCache:
    """A one-row shared cache holding five prompt columns."""
    shared = SharedCache(lm, 1)
    ids = torch.arange(3, 8)[None]
    shared.extend(lm.model.get_input_embeddings()(ids), torch.ones_like(ids, dtype=torch.bool), ids,
                  SegmentKey("planner", "prompt"))
    return shared


def _judger_prompts(lm, *questions):
    """The judger's encoded prompts for `questions`: ids and mask `[batch, n]`."""
    task = get_task("gsm8k")
    _, ids, mask = encode(lm, [agent_prompt("judger", q, task.answer_instruction) for q in questions], False)
    return ids, mask


def _greedy_decode(lm, shared, ids, mask, max_new_tokens, while_decoding, fast=False):
    """Greedy decoding of `max_new_tokens` (EOS ignored) for one row, by the plain loop unless `fast`;
    returns its tokens."""
    sampling = decoding.Sampling(max_new_tokens, temperature=0.0, ignore_eos=True, fast=fast)
    return decoding.generate(shared, ids, mask, "judger", sampling, decoding.problem_generators([1], 0, lm.device),
                             while_decoding=while_decoding)


@pytest.mark.parametrize("method", ["latent_mas", "baseline"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_fast_decode_matches_plain(tiny_lm, fake_problems, tmp_path, method, temperature, batch_size,
                                  monkeypatch):
    from latentmas.fast_decode import StaticStep

    problems = fake_problems()
    plain, plain_file = _solve(tiny_lm, problems, method, tmp_path, batch_size, fast_decode=False,
                               temperature=temperature)
    tiny_lm.static_steps.clear()
    started, start = [], StaticStep.start
    monkeypatch.setattr(StaticStep, "start", lambda self, *args: started.append(self.tokens) or start(self, *args))
    fast, fast_file = _solve(tiny_lm, problems, method, tmp_path, batch_size, fast_decode=True,
                             temperature=temperature)
    assert True in started  # the fast path decoded
    assert [r.output for r in fast] == [r.output for r in plain]
    assert all(r.agents[-1].output_tokens > 0 for r in fast)
    if method == "latent_mas":
        assert False in started  # ... and ran the latent steps
        # float16 storage; the latent steps ran on another (equivalent) attention layout
        assert_same_handoffs(plain_file, fast_file, atol=2e-3, names=TRANSITIONS)


class _KeysAtHandoffs:
    def __init__(self):
        self.seen = []

    def on_handoff(self, event):
        shared = event.shared
        self.seen.append((shared.mask.clone(), shared.positions.clone(), shared.token_ids.clone(),
                          [(layer.keys.clone(), layer.values.clone()) for layer in shared.cache.layers]))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fast_latent_steps_build_the_same_cache(tiny_lm, fake_problems, batch_size):
    """The latent phase on the static buffer leaves the shared cache the plain loop leaves."""
    problems = fake_problems()[:batch_size]
    task = get_task("gsm8k")
    seen = {}
    tiny_lm.static_steps.clear()
    for fast in (False, True):
        cfg = RunConfig(model_name="tiny-qwen3", device="cpu", latent_steps=5, max_new_tokens=4,
                        temperature=0.0, fast_decode=fast)
        observer = _KeysAtHandoffs()
        get_method("latent_mas")(tiny_lm, problems, task, cfg, observer=observer)
        seen[fast] = observer.seen
    assert len(seen[True]) == len(seen[False]) == 3
    assert any(not key[0] for key in tiny_lm.static_steps)  # the fast run's latent steps used a buffer
    for (mask_a, pos_a, ids_a, kv_a), (mask_b, pos_b, ids_b, kv_b) in zip(seen[False], seen[True]):
        assert torch.equal(mask_a, mask_b) and torch.equal(pos_a, pos_b) and torch.equal(ids_a, ids_b)
        for (ka, va), (kb, vb) in zip(kv_a, kv_b):
            real = mask_a[:, None, :, None].expand_as(ka)
            torch.testing.assert_close(kb[real], ka[real], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vb[real], va[real], atol=1e-5, rtol=1e-5)



def test_capacity_buckets():
    from latentmas.kv_storage import capacity_for

    # an eighth more than needed, in steps of 128 columns, at least 256
    assert [capacity_for(n) for n in (1, 228, 229, 879, 1131, 2048)] == [256, 256, 384, 1024, 1280, 2304]


def test_a_cache_and_its_steps_hold_the_keys_once(tiny_lm, fake_problems):
    """The static steps step on the shared cache's own buffers: one copy of the keys per batch."""
    from latentmas import fast_decode

    shared = _five_columns(tiny_lm)
    tiny_lm.static_steps.clear()
    step = fast_decode.static_step(tiny_lm, shared, 4, tokens=False, use_graph=False)
    before = shared.cache.layers[0].keys.clone()
    hidden = torch.randn(1, tiny_lm.hidden_size)
    for _ in range(4):
        hidden = step.run(hidden)
    for layer, keys in zip(shared.cache.layers, step.kv.keys):
        assert layer.keys.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
    assert torch.equal(shared.cache.layers[0].keys, before)  # the cache's columns untouched by the steps
    assert not torch.equal(step.kv.keys[0][:, :, 5:9], torch.zeros_like(step.kv.keys[0][:, :, 5:9]))
    shared.adopt(step.kv, 4, -1, SegmentKey("planner", "latent"))  # taken in without a copy
    assert shared.length == 9 and torch.equal(shared.cache.layers[0].keys[:, :, 5:], step.kv.keys[0][:, :, 5:9])


def test_storage_is_lent_to_one_cache_at_a_time(tiny_lm):
    """A live cache keeps its storage; the next cache reuses it only once the first is gone."""
    import gc

    tiny_lm.static_steps.clear()
    first = SharedCache(tiny_lm, 1)
    second = SharedCache(tiny_lm, 1)
    assert first.storage is not second.storage
    kept = first.storage
    del first, second
    gc.collect()
    third = SharedCache(tiny_lm, 1, capacity=100)
    assert third.storage is kept  # free and big enough: lent again
    del third
    bigger = SharedCache(tiny_lm, 1, capacity=1000)
    assert bigger.storage is not kept and bigger.storage.capacity >= 1000
    assert tiny_lm.kv_storage is bigger.storage  # the free one it outgrew was dropped


def test_reused_steps_forget_earlier_problems(tiny_lm, fake_problems):
    """A step reused from an earlier problem decodes what a freshly built one decodes."""
    problems = fake_problems()
    task = get_task("gsm8k")
    cfg = RunConfig(model_name="tiny-qwen3", device="cpu", latent_steps=4, max_new_tokens=12, temperature=0.0,
                    fast_decode=True)
    solve = get_method("latent_mas")
    tiny_lm.static_steps.clear()
    fresh = solve(tiny_lm, problems[1:2], task, cfg)[0]
    built = dict(tiny_lm.static_steps)
    assert {key[0] for key in built} == {True, False, "prefill"}  # decode and latent steps, prefill chunks
    tiny_lm.static_steps.clear()
    solve(tiny_lm, problems[2:3], task, cfg)  # a longer problem first: its columns stay in the buffers
    steps_before = {key: id(step) for key, step in tiny_lm.static_steps.items()}
    again = solve(tiny_lm, problems[1:2], task, cfg)[0]
    assert again.output == fresh.output
    reused = [key for key, step in tiny_lm.static_steps.items() if steps_before.get(key) == id(step)]
    assert reused, "no step was reused"


@pytest.mark.parametrize("max_new_tokens", [5, 40])
def test_while_decoding_runs_once_with_steps_queued(tiny_lm, max_new_tokens):
    """`while_decoding` is called once: after OVERLAP_AFTER + 1 steps, or at the end of a shorter decode."""
    ids, mask = _judger_prompts(tiny_lm, "What is 2 + 3?")
    shared = SharedCache(tiny_lm, 1)
    seen = []
    outputs = _greedy_decode(tiny_lm, shared, ids, mask, max_new_tokens, lambda: seen.append(shared.length))
    prompt = ids.shape[1]
    forwards = min(decoding.OVERLAP_AFTER + 1, max_new_tokens - 1)  # the plain loop adds a column per forward
    assert seen == [prompt + forwards]
    assert len(outputs[0]) == max_new_tokens


def test_steps_of_another_batch_size_are_dropped(tiny_lm, fake_problems):
    task = get_task("gsm8k")
    cfg = RunConfig(model_name="tiny-qwen3", device="cpu", latent_steps=2, max_new_tokens=4, temperature=0.0,
                    fast_decode=True)
    solve = get_method("latent_mas")
    tiny_lm.static_steps.clear()
    solve(tiny_lm, fake_problems()[:2], task, cfg)
    assert {step.kv.mask.shape[0] for step in tiny_lm.static_steps.values()} == {2}
    solve(tiny_lm, fake_problems()[2:], task, cfg)
    assert {step.kv.mask.shape[0] for step in tiny_lm.static_steps.values()} == {1}
    assert tiny_lm.kv_storage.batch == 1


def test_a_cast_model_gets_steps_of_its_new_dtype(tiny_lm, fake_problems):
    """Steps built before the model was cast are not reused after (their buffers hold the old dtype)."""
    from latentmas.methods import latent_mas

    task = get_task("gsm8k")
    cfg = RunConfig(model_name="tiny-qwen3", device="cpu", latent_steps=2, max_new_tokens=4, temperature=0.0,
                    fast_decode=True)
    solve = get_method("latent_mas")
    tiny_lm.static_steps.clear()
    solve(tiny_lm, fake_problems()[:1], task, cfg)
    assert {step.kv.keys[0].dtype for step in tiny_lm.static_steps.values()} == {torch.float32}
    def tensors():  # parameters and buffers (RoPE's inv_freq too); casting replaces the buffers
        return dict(tiny_lm.model.named_parameters()) | dict(tiny_lm.model.named_buffers())

    saved = {name: tensor.detach().clone() for name, tensor in tensors().items()}  # bf16 rounds them
    try:
        tiny_lm.model.to(torch.bfloat16)
        latent_mas._LATENT_INPUT[:] = [None, None, None]
        solve(tiny_lm, fake_problems()[:1], task, cfg)
        assert {step.kv.keys[0].dtype for step in tiny_lm.static_steps.values()} == {torch.bfloat16}
    finally:
        tiny_lm.model.to(torch.float32)
        with torch.no_grad():  # the session's model as it was, for the tests after this one
            for name, tensor in tensors().items():
                tensor.copy_(saved[name])
        latent_mas._LATENT_INPUT[:] = [None, None, None]
        tiny_lm.static_steps.clear()


def test_a_full_step_says_so(tiny_lm):
    from latentmas.fast_decode import StaticKV, StaticStep

    shared = _five_columns(tiny_lm)
    kv = StaticKV(shared.storage)
    step = StaticStep(tiny_lm, kv, use_graph=False).start(shared)
    token = torch.tensor([3])
    for _ in range(kv.capacity - 5):
        step.run(token)
    with pytest.raises(RuntimeError, match="full"):
        step.run(token)
    other = _five_columns(tiny_lm)  # alive beside `shared`: storage of its own
    with pytest.raises(RuntimeError, match="storage of the cache it continues"):
        step.start(other)


def test_steps_share_one_buffer_that_grows_when_needed(tiny_lm):
    """Decoding and latent steps take turns on the cache's storage; one that needs more room grows it
    (keeping the cached columns) and the steps are built again on the new buffers."""
    from latentmas import fast_decode

    tiny_lm.static_steps.clear()
    tiny_lm.kv_storage = None
    shared = _five_columns(tiny_lm)
    decode = fast_decode.static_step(tiny_lm, shared, 10, tokens=True, use_graph=False)
    latent = fast_decode.static_step(tiny_lm, shared, 10, tokens=False, use_graph=False)
    assert latent.kv is decode.kv and decode.kv.capacity == shared.storage.capacity == 256
    keys = shared.cache.layers[1].keys.clone()
    larger = fast_decode.static_step(tiny_lm, shared, 300, tokens=True, use_graph=False)  # 305 columns
    assert larger is not decode and larger.kv.capacity == shared.storage.capacity == 512  # at least doubled
    assert not decode.kv.current() and larger.kv.current()
    assert list(tiny_lm.static_steps) == [(True, False, False, None)]  # the steps on the old buffers went
    assert torch.equal(shared.cache.layers[1].keys, keys)  # the cached columns moved with the storage
    again = fast_decode.static_step(tiny_lm, shared, 10, tokens=False, use_graph=False)  # fits: reuses it
    assert again.kv is larger.kv and len(tiny_lm.static_steps) == 2
    tiny_lm.static_steps.clear()


def test_compiled_step_matches_eager_and_serves_every_size(tiny_lm):
    """The torch.compile'd step (inductor on the CPU here) computes what the eager step computes,
    for decoding at two buffer sizes, without compiling again for the second size."""
    from latentmas.fast_decode import StaticKV, StaticStep

    ids, mask = _judger_prompts(tiny_lm, "What is 2 + 3?", "Add 17 and 25.")
    shared = SharedCache(tiny_lm, 2)
    logits = shared.extend(tiny_lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("judger", "prompt"),
                           logits=True)
    token = logits.argmax(-1)

    def steps(step, n=4):
        step.start(shared)
        out, ids = [], token
        for _ in range(n):
            out.append(step.run(ids).clone())
            ids = out[-1].argmax(-1)
        return torch.stack(out)

    kv = StaticKV(shared.storage)
    eager = steps(StaticStep(tiny_lm, kv, use_graph=False, compiled=False))
    compiled = steps(StaticStep(tiny_lm, kv, use_graph=False, compiled=True))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert not torch.equal(eager[0], eager[1])  # the steps differ: a check that could fail
    shared.reserve(600)  # the storage grows: buffers of another length
    with torch._dynamo.config.patch(error_on_recompile=True):
        larger = steps(StaticStep(tiny_lm, StaticKV(shared.storage), use_graph=False, compiled=True))
    assert shared.storage.capacity > kv.capacity
    torch.testing.assert_close(larger, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny_lm", "fused_lm"])
def test_compiled_sampling_step_draws_what_the_eager_one_draws(model, request):
    """A decoding step that samples inside itself, compiled, draws the tokens the eager step draws; on a
    fused model too, whose projection groups keep outputs between member calls (torch.compile traces that)."""
    from latentmas.fast_decode import StaticKV, StaticStep
    from latentmas.sampling import Sampler

    lm = request.getfixturevalue(model)
    ids, mask = _judger_prompts(lm, "What is 2 + 3?", "Add 17 and 25.")
    shared = SharedCache(lm, 2)
    logits = shared.extend(lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("judger", "prompt"),
                           logits=True)
    kv = StaticKV(shared.storage)
    drawn = {}
    for compiled in (False, True):
        sampler = Sampler(decoding.Sampling(temperature=1.5, top_p=0.9), decoding.problem_generators([4, 9], 0, "cpu"))
        token = sampler(logits)
        step = StaticStep(lm, kv, use_graph=False, compiled=compiled, sampling=sampler.settings)
        step.start(shared, sampler)
        tokens = []
        for _ in range(6):
            token = step.run(token).clone()
            tokens.append(token)
        drawn[compiled] = torch.stack(tokens)
    assert torch.equal(drawn[True], drawn[False])
    assert len(set(drawn[False].flatten().tolist())) > 2  # sampled, not one repeated token


@pytest.mark.parametrize("max_new_tokens", [5, 40])
def test_while_decoding_work_in_pieces_takes_one_per_step(tiny_lm, max_new_tokens):
    """Work returned as an iterator is done a piece per decoding step (all of it at the end of a short decode)."""
    ids, mask = _judger_prompts(tiny_lm, "What is 2 + 3?")
    shared = SharedCache(tiny_lm, 1)
    seen = []

    def pieces():
        for _ in range(4):
            seen.append(shared.length)
            yield

    _greedy_decode(tiny_lm, shared, ids, mask, max_new_tokens, pieces)
    prompt = ids.shape[1]
    if max_new_tokens > decoding.OVERLAP_AFTER + 4:
        first = prompt + decoding.OVERLAP_AFTER + 1
        assert seen == [first, first + 1, first + 2, first + 3]
    else:
        assert seen == [prompt + max_new_tokens - 1] * 4


def test_pieces_run_on_cuda_only_while_the_device_is_more_than_lead_steps_behind():
    """`decoding._Pacer` with fake CUDA events: no piece until more than LEAD steps are queued, then pieces
    while the device has not finished the step LEAD before the last queued (each piece here lets the fake
    device finish one more step)."""
    pacer = decoding._Pacer(torch.device("cpu"))
    finished = []

    class Event:  # a step's event: done once the fake device has finished that step
        def record(self):
            self.step = pacer.count

        def query(self):
            return self.step in finished

    pacer.events = [Event() for _ in range(decoding.LEAD + 1)]
    taken = []

    def pieces():
        for piece in range(100):
            taken.append(piece)
            finished.append(len(finished))  # the device finishes one more step meanwhile
            yield

    work = pieces()
    for _ in range(decoding.LEAD):
        pacer.queued()
        assert pacer.take(work) is work and taken == []  # at most LEAD steps queued: the device may run dry
    for _ in range(3):
        pacer.queued()
    assert pacer.take(work) is work
    assert taken == [0, 1, 2]  # steps 0..2 finished: LEAD + 3 queued, the device is LEAD behind the host
    pacer.queued()
    pacer.take(work)
    assert taken == [0, 1, 2, 3]
    pacer.before_waiting(work)  # the host will wait for the device: pieces until its last step is done
    assert taken == list(range(decoding.LEAD + 4)) and finished[-1] == pacer.count - 1
    assert pacer.take(None) is None and pacer.take("done") is None  # no work, or work that was no iterator
    assert decoding._Pacer(torch.device("cpu")).before_waiting(work) is work and len(taken) == decoding.LEAD + 4


def test_out_of_memory_while_building_is_retried_once(tiny_lm, monkeypatch):
    """A step that runs out of GPU memory while it is built (recording its graph) is built once more,
    after the allocator's cache is emptied, on the same buffers."""
    from latentmas import fast_decode

    shared = _five_columns(tiny_lm)
    tiny_lm.static_steps.clear()
    built, emptied = [], []
    original = fast_decode.StaticStep.__init__

    def flaky(self, *args, **kwargs):
        built.append(args[1] if len(args) > 1 else kwargs["kv"])
        if len(built) == 1:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        original(self, *args, **kwargs)

    monkeypatch.setattr(fast_decode.StaticStep, "__init__", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(len(built)))
    step = fast_decode.static_step(tiny_lm, shared, 10, tokens=False, use_graph=False)
    assert len(built) == 2 and built[0] is built[1] is step.kv and emptied == [1]
    assert step.run(torch.randn(1, tiny_lm.hidden_size)).shape == (1, tiny_lm.hidden_size)
    tiny_lm.static_steps.clear()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_decode_matches_plain_on_other_families(tiny_lm, family):
    """Models that build their own attention masks (Llama) still get the step's mask: the fast path
    decodes what the plain loop decodes, left padding included."""
    from test_similarity_modes import tiny_other

    lm = tiny_other(tiny_lm, family)
    lm.model.config._attn_implementation = "sdpa"
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 9]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False
    outputs = []
    for fast in (False, True):
        shared = SharedCache(lm, 2, capacity=64)
        sampling = decoding.Sampling(12, temperature=0.0, ignore_eos=True, fast=fast)
        outputs.append(decoding.generate(shared, ids, mask, "judger", sampling,
                                         decoding.problem_generators([1, 2], 0, lm.device)))
        del shared
    assert outputs[1] == outputs[0]


def test_what_an_earlier_batch_left_in_the_storage_is_never_read(tiny_lm):
    """Slots past a cache's columns may hold anything (NaN included) from an earlier batch; the fast
    path decodes as if they were empty."""
    import gc

    ids, mask = _judger_prompts(tiny_lm, "What is 2 + 3?")
    outputs = []
    for fast in (False, True):
        tiny_lm.static_steps.clear()
        gc.collect()
        shared = SharedCache(tiny_lm, 1, capacity=300)
        for buffer in (*shared.storage.keys, *shared.storage.values):
            buffer.fill_(float("nan"))
        outputs.append(_greedy_decode(tiny_lm, shared, ids, mask, 10, None, fast=fast))
        del shared
    assert outputs[1] == outputs[0]


def test_the_step_compiles_in_inductors_deterministic_mode(monkeypatch):
    """The compiled step's reductions take inductor's fixed launch configs, not ones picked by timing
    (a fixed cost of measuring swamped those timings, and one pick made the step 0.5 ms slower:
    `fast_decode`)."""
    from latentmas import fast_decode

    calls = []
    monkeypatch.setattr(fast_decode, "_COMPILED", [])
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    assert fast_decode.compiled_model_step() is fast_decode.model_step
    assert calls == [{"fullgraph": True, "dynamic": False, "options": {"deterministic": True}}]
    assert "deterministic" in torch._inductor.config.get_config_copy()  # an option this torch knows
