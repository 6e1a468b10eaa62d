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


def _greedy_decode(lm, shared, ids, mask, max_new_tokens, while_decoding):
    """Plain-loop greedy decoding of `max_new_tokens` (EOS ignored) for one row; returns its tokens."""
    sampling = decoding.Sampling(max_new_tokens, temperature=0.0, ignore_eos=True, fast=False)
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
    monkeypatch.setattr(StaticStep, "start", lambda self, shared: started.append(self.tokens) or start(self, shared))
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
    from latentmas.fast_decode import capacity_for

    assert [capacity_for(n) for n in (1, 256, 257, 600, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]


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
    assert {key[0] for key in built} == {True, False}  # a decode step and a latent step
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
    assert {key[1] for key in tiny_lm.static_steps} == {2}
    solve(tiny_lm, fake_problems()[2:], task, cfg)
    assert {key[1] for key in tiny_lm.static_steps} == {1}


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
    try:
        tiny_lm.model.to(torch.bfloat16)
        latent_mas._LATENT_INPUT[:] = [None, None, None]
        solve(tiny_lm, fake_problems()[:1], task, cfg)
        assert {step.kv.keys[0].dtype for step in tiny_lm.static_steps.values()} == {torch.bfloat16}
    finally:
        tiny_lm.model.to(torch.float32)
        latent_mas._LATENT_INPUT[:] = [None, None, None]
        tiny_lm.static_steps.clear()


def test_a_full_step_says_so(tiny_lm):
    from latentmas.fast_decode import StaticStep

    shared = _five_columns(tiny_lm)
    step = StaticStep(tiny_lm, 1, 7, use_graph=False).start(shared)
    token = torch.tensor([3])
    step.run(token)
    step.run(token)
    with pytest.raises(RuntimeError, match="full"):
        step.run(token)
    with pytest.raises(ValueError, match="does not fit a 5-slot"):
        StaticStep(tiny_lm, 1, 5, use_graph=False).start(shared)
    with pytest.raises(ValueError, match="batch of 1 does not fit a step built for 4"):
        StaticStep(tiny_lm, 4, 256, use_graph=False).start(shared)


def test_steps_share_one_buffer_that_grows_when_needed(tiny_lm):
    """Decoding and latent steps take turns on one buffer; a step that needs more room replaces it."""
    from latentmas import fast_decode

    shared = _five_columns(tiny_lm)
    tiny_lm.static_steps.clear()
    decode = fast_decode.static_step(tiny_lm, shared, 10, tokens=True, use_graph=False)
    latent = fast_decode.static_step(tiny_lm, shared, 10, tokens=False, use_graph=False)
    assert latent.kv is decode.kv and decode.kv.capacity == 256
    larger = fast_decode.static_step(tiny_lm, shared, 300, tokens=True, use_graph=False)  # 305 columns: 512 slots
    assert larger is not decode and larger.kv.capacity == 512
    assert [(k[0], k[2]) for k in tiny_lm.static_steps] == [(True, 512)]  # the 256-slot buffer went
    again = fast_decode.static_step(tiny_lm, shared, 10, tokens=False, use_graph=False)  # fits: reuses it
    assert again.kv is larger.kv and len(tiny_lm.static_steps) == 2
    tiny_lm.static_steps.clear()


def test_compiled_step_matches_eager_and_serves_every_size(tiny_lm):
    """The torch.compile'd step (inductor on the CPU here) computes what the eager step computes,
    for decoding at two buffer sizes, without compiling again for the second size."""
    from latentmas.fast_decode import StaticStep

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

    eager = steps(StaticStep(tiny_lm, 2, 256, use_graph=False, compiled=False))
    compiled = steps(StaticStep(tiny_lm, 2, 256, use_graph=False, compiled=True))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert not torch.equal(eager[0], eager[1])  # the steps differ: a check that could fail
    with torch._dynamo.config.patch(error_on_recompile=True):
        larger = steps(StaticStep(tiny_lm, 2, 512, use_graph=False, compiled=True))
    torch.testing.assert_close(larger, eager, atol=1e-4, rtol=1e-4)


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


def test_out_of_memory_retry_frees_the_old_buffer_first(tiny_lm, monkeypatch):
    """A step that runs out of GPU memory is built again after every earlier buffer has gone (no two alive)."""
    import gc
    import weakref

    from latentmas import fast_decode

    shared = _five_columns(tiny_lm)
    tiny_lm.static_steps.clear()
    old = weakref.ref(fast_decode.static_step(tiny_lm, shared, 10, tokens=True, use_graph=False).kv)
    alive_at_retry, built = [], []
    original = fast_decode.StaticStep.__init__

    def flaky(self, *args, **kwargs):
        built.append(kwargs.get("kv") is not None)
        if len(built) == 1:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        gc.collect()
        alive_at_retry.append(old() is not None)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fast_decode.StaticStep, "__init__", flaky)
    step = fast_decode.static_step(tiny_lm, shared, 10, tokens=False, use_graph=False)  # would share the buffer
    assert built == [True, False]  # first on the shared buffer, then on a fresh one
    assert alive_at_retry == [False] and step.kv is not None
    tiny_lm.static_steps.clear()
