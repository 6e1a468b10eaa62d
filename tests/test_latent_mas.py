"""latent_mas: shared-cache bookkeeping, realignment, kNN selection, batch independence, similarities."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from captures import tiny_config

from latentmas.handoff import HandoffEvent
from latentmas.knn import KnnFilter
from latentmas.methods import get_method
from latentmas.methods.common import encode
from latentmas.prompts import AGENTS, agent_prompt
from latentmas.realign import LatentInput
from latentmas.shared_cache import LATENT, PAD, SegmentKey, SharedCache
from latentmas.similarity import get_mode, maths
from latentmas.similarity.maths import layer_similarities, reduce_query
from latentmas.tasks import get_task

TASK = get_task("gsm8k")


def prompt_lengths(lm, problems, cfg) -> dict[str, list[int]]:
    """Real prompt tokens of each agent for each problem, encoded one problem at a time."""
    lengths = {}
    for agent in AGENTS:
        lengths[agent] = []
        for problem in problems:
            prompt = agent_prompt(agent, problem.question, TASK.answer_instruction, cfg.prompt, "latent_mas")
            _, ids, mask = encode(lm, [prompt], cfg.think)
            assert bool(mask.all())
            lengths[agent].append(ids.shape[1])
    return lengths


class Recorder:
    """A HandoffObserver that copies what each problem's next agent is about to read."""

    def __init__(self):
        self.events: list[dict] = []

    def on_handoff(self, event: HandoffEvent) -> None:
        shared = event.shared
        rows = []
        for row in range(shared.batch_size):
            real = shared.real_columns(row)
            rows.append({
                "keys": [layer.keys[row][:, real].clone() for layer in shared.cache.layers],
                "values": [layer.values[row][:, real].clone() for layer in shared.cache.layers],
                "positions": shared.positions[row, real].clone(),
                "token_ids": shared.token_ids[row, real].clone(),
                "segments": [shared.segments[i] for i in shared.segment_ids[row, real].tolist()],
                "query": event.query[row].clone(),
            })
        self.events.append({
            "from": event.from_agent, "to": event.to_agent, "lengths": shared.mask.sum(1).tolist(),
            "width": shared.length, "prompt_lengths": event.prompt_mask.sum(1).tolist(), "rows": rows,
            "numbers": [p.number for p in event.problems],
        })


# --------------------------------------------------------------------------- cache lengths


@pytest.mark.parametrize("latent_steps", [0, 4])
def test_cache_length_at_each_handoff(tiny_lm, fake_problems, latent_steps):
    problems = fake_problems()
    cfg = tiny_config(latent_steps=latent_steps, max_new_tokens=2)
    recorder = Recorder()
    results = get_method("latent_mas")(tiny_lm, problems, TASK, cfg, observer=recorder)
    lengths = prompt_lengths(tiny_lm, problems, cfg)
    assert len(set(lengths["planner"])) == len(problems), "problems should have different prompt lengths"

    assert [(e["from"], e["to"]) for e in recorder.events] == list(zip(AGENTS[:-1], AGENTS[1:]))
    for index, event in enumerate(recorder.events, start=1):
        earlier = AGENTS[:index]
        expected = [sum(lengths[a][b] + latent_steps for a in earlier) for b in range(len(problems))]
        assert event["lengths"] == expected, (event["from"], event["to"])
        assert event["width"] == max(expected)  # left padding only up to the longest row
        assert event["prompt_lengths"] == lengths[AGENTS[index]]
        for b, row in enumerate(event["rows"]):
            # without kNN the real columns are numbered 0..n-1 and labelled by agent
            assert row["positions"].tolist() == list(range(expected[b]))
            want = []
            for agent in earlier:
                want += [SegmentKey(agent, "prompt")] * lengths[agent][b] + [SegmentKey(agent, "latent")] * latent_steps
            assert row["segments"] == want
            assert (row["token_ids"] == LATENT).sum().item() == latent_steps * len(earlier)
            assert not (row["token_ids"] == PAD).any()

    if latent_steps == 0:
        # the judger still reads the three earlier prompts
        last = recorder.events[-1]
        assert last["to"] == "judger"
        assert last["lengths"] == [sum(lengths[a][b] for a in AGENTS[:3]) for b in range(len(problems))]

    for result, b in zip(results, range(len(problems))):
        assert [t.agent for t in result.agents] == list(AGENTS)
        assert [t.input_tokens for t in result.agents] == [lengths[a][b] for a in AGENTS]
        assert [t.latent_steps for t in result.agents] == [latent_steps] * 3 + [0]
        assert all(t.output == "" for t in result.agents[:3])


def test_query_is_mean_prompt_embedding(tiny_lm, fake_problems):
    problems = fake_problems()[:2]
    cfg = tiny_config(latent_steps=1, max_new_tokens=1)
    recorder = Recorder()
    get_method("latent_mas")(tiny_lm, problems, TASK, cfg, observer=recorder)
    embed = tiny_lm.model.get_input_embeddings()
    for event in recorder.events:
        for b, problem in enumerate(problems):
            prompt = agent_prompt(event["to"], problem.question, TASK.answer_instruction, cfg.prompt, "latent_mas")
            _, ids, _ = encode(tiny_lm, [prompt], False)
            torch.testing.assert_close(event["rows"][b]["query"], embed(ids)[0].float().mean(0), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- realignment


def test_realign_matrix_and_norm(tiny_lm):
    latent = LatentInput(tiny_lm, realign=True)
    w_in = tiny_lm.model.get_input_embeddings().weight.detach().float()
    w_out = tiny_lm.model.get_output_embeddings().weight.detach().float()
    assert not torch.equal(w_in, w_out), "tiny-qwen3 should not tie embeddings"
    hidden = w_out.shape[1]
    expected = torch.linalg.solve(w_out.T @ w_out + 1e-5 * torch.eye(hidden), w_out.T @ w_in)
    assert latent.matrix.shape == (hidden, hidden)
    torch.testing.assert_close(latent.matrix, expected, rtol=1e-5, atol=1e-6)

    target = w_in.norm(dim=1).mean()
    h = torch.randn(5, hidden, generator=torch.Generator().manual_seed(0)) * 7
    out = latent(h)
    assert out.dtype == tiny_lm.dtype and out.shape == h.shape
    torch.testing.assert_close(out.norm(dim=-1), target.expand(5), rtol=1e-5, atol=1e-5)
    direct = h @ expected
    torch.testing.assert_close(out, direct * (target / direct.norm(dim=-1, keepdim=True)), rtol=1e-4, atol=1e-5)


def test_no_realign_rescales_only(tiny_lm):
    latent = LatentInput(tiny_lm, realign=False)
    assert latent.matrix is None
    w_in = tiny_lm.model.get_input_embeddings().weight.detach().float()
    target = w_in.norm(dim=1).mean()
    h = torch.randn(4, w_in.shape[1], generator=torch.Generator().manual_seed(1)) * 3
    out = latent(h)
    torch.testing.assert_close(out, h * (target / h.norm(dim=-1, keepdim=True)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), target.expand(4), rtol=1e-5, atol=1e-5)


def test_realign_changes_the_run(tiny_lm, fake_problems):
    problems = fake_problems()[:1]
    runs = []
    for realign in (False, True):
        recorder = Recorder()
        get_method("latent_mas")(tiny_lm, problems, TASK, tiny_config(latent_space_realign=realign, max_new_tokens=1),
                                 observer=recorder)
        runs.append(recorder.events[0]["rows"][0]["keys"][0])
    assert runs[0].shape == runs[1].shape
    assert not torch.allclose(runs[0], runs[1])  # the latent columns differ


# --------------------------------------------------------------------------- kNN selection


def expected_k(real: int, percentage: float, min_keep: int) -> int:
    return min(real, max(math.floor(Fraction(str(percentage)) * real), min_keep))


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("strategy", ["top", "bottom", "random"])
@pytest.mark.parametrize("percentage", [1.0, 0.8, 0.5, 0.29, 0.1, 1e-6])
@pytest.mark.parametrize("min_keep", [0, 1, 5])
def test_knn_keeps_k_columns(strategy, percentage, min_keep):
    for real in (1, 3, 5, 7, 10, 37, 100):
        scores = torch.randn(1, real, generator=torch.Generator().manual_seed(real))
        mask = torch.ones(1, real, dtype=torch.bool)
        keep = KnnFilter(percentage, min_keep, strategy).keep_mask(scores, mask, generators([real]))
        assert keep.dtype == torch.bool and keep.shape == (1, real)
        k = expected_k(real, percentage, min_keep)
        assert int(keep.sum()) == k, (real, percentage, min_keep)
        assert keep[0, real - min(real, min_keep):].all()  # the most recent always stay
        if percentage == 1.0:
            assert keep.all()
        if percentage == 1e-6:
            assert int(keep.sum()) == min(real, min_keep)


def test_knn_top_and_bottom_choose_by_score():
    # scores rise with position, except the 3 most recent, which score lowest
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.8, 0.4, -1.0, -1.0, -1.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    top = KnnFilter(0.6, 3, "top").keep_mask(scores, mask)
    # k = 6: the 3 most recent + the 3 best older ones (0.9, 0.8, 0.5)
    assert top[0].nonzero().squeeze(1).tolist() == [1, 3, 5, 7, 8, 9]
    bottom = KnnFilter(0.6, 3, "bottom").keep_mask(scores, mask)
    # the 3 worst older ones (0.1, 0.2, 0.3)
    assert bottom[0].nonzero().squeeze(1).tolist() == [0, 2, 4, 7, 8, 9]


def test_knn_ties_keep_older_first():
    scores = torch.zeros(1, 8)
    mask = torch.ones(1, 8, dtype=torch.bool)
    keep = KnnFilter(0.5, 2, "top").keep_mask(scores, mask)
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 1, 6, 7]


@pytest.mark.parametrize("strategy", ["top", "bottom", "random"])
def test_knn_left_padding_never_kept(strategy):
    # row 0: 10 real; row 1: 4 padding + 6 real; row 2: 8 padding + 2 real (fewer than min_keep)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :8] = False
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    scores[~mask] = 100.0  # would win "top" if padding were considered
    scores_bottom = scores.clone()
    scores_bottom[~mask] = -100.0
    used = scores_bottom if strategy == "bottom" else scores
    keep = KnnFilter(0.5, 3, strategy).keep_mask(used, mask, generators([1, 2, 3]))
    assert not (keep & ~mask).any()
    assert keep.sum(1).tolist() == [expected_k(10, 0.5, 3), expected_k(6, 0.5, 3), 2]
    for row in range(3):
        real = mask[row].nonzero().squeeze(1)
        assert keep[row, real[-3:]].all()
    # a left-padded row chooses the same columns as the row alone
    for row in range(3):
        real = mask[row].nonzero().squeeze(1)
        alone = KnnFilter(0.5, 3, strategy).keep_mask(used[row:row + 1, real], mask[row:row + 1, real],
                                                     generators([row + 1]))
        assert torch.equal(keep[row, real], alone[0])


def test_knn_random_ignores_padding():
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :4] = False
    scores = torch.zeros(1, 12)
    padded = KnnFilter(0.5, 2, "random").keep_mask(scores, mask, generators([7]))
    alone = KnnFilter(0.5, 2, "random").keep_mask(scores[:, 4:], mask[:, 4:], generators([7]))
    assert torch.equal(padded[0, 4:], alone[0])


def test_knn_random_is_seeded():
    scores = torch.zeros(2, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    knn = KnnFilter(0.3, 2, "random")
    first = knn.keep_mask(scores, mask, generators([11, 12]))
    again = knn.keep_mask(scores, mask, generators([11, 12]))
    assert torch.equal(first, again)
    other = knn.keep_mask(scores, mask, generators([13, 14]))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    # each row follows its own generator: swapping generators swaps rows
    swapped = knn.keep_mask(scores, mask, generators([12, 11]))
    assert torch.equal(swapped[0], first[1]) and torch.equal(swapped[1], first[0])
    # random ignores the scores
    assert torch.equal(knn.keep_mask(torch.randn(2, 40), mask, generators([11, 12])), first)
    with pytest.raises(ValueError, match="generator"):
        knn.keep_mask(scores, mask, None)
    with pytest.raises(ValueError, match="generator"):
        knn.keep_mask(scores, mask, generators([1]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(percentage=0.0), "percentage"), (dict(percentage=1.5), "percentage"), (dict(percentage=-0.1), "percentage"),
    (dict(min_keep=-1), "min_keep"), (dict(strategy="middle"), "strategy"),
])
def test_knn_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KnnFilter(**kwargs)


def _filled_cache(lm, rows, latent_steps=2):
    """A SharedCache with the token-id lists `rows` left-padded, then `latent_steps` latent columns."""
    batch, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((batch, width), lm.tokenizer.pad_token_id)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = True
    shared = SharedCache(lm, batch)
    embed = lm.model.get_input_embeddings()
    hidden = shared.extend(embed(ids), mask, ids, SegmentKey("planner", "prompt"))
    latent = LatentInput(lm, False)
    ones = torch.ones(batch, 1, dtype=torch.bool)
    for _ in range(latent_steps):
        hidden = shared.extend(latent(hidden)[:, None], ones, torch.full((batch, 1), LATENT),
                               SegmentKey("planner", "latent"))
    return shared


def _random_rows(lm, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, lm.model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_shared_cache_keep_moves_everything_consistently(tiny_lm):
    shared = _filled_cache(tiny_lm, _random_rows(tiny_lm, [9, 5, 12]), latent_steps=2)
    T = shared.length
    assert T == 14 and shared.mask.sum(1).tolist() == [11, 7, 14]
    before = {
        "keys": [layer.keys.clone() for layer in shared.cache.layers],
        "values": [layer.values.clone() for layer in shared.cache.layers],
        "positions": shared.positions.clone(), "token_ids": shared.token_ids.clone(),
        "segment_ids": shared.segment_ids.clone(), "mask": shared.mask.clone(),
    }
    assert before["positions"][0].tolist() == [-1] * 3 + list(range(11))
    keep = torch.rand(3, T, generator=torch.Generator().manual_seed(3)) < 0.5
    keep[:, 0] = True  # a padding column asked for: must be ignored
    shared.keep(keep)
    kept = keep & before["mask"]
    counts = kept.sum(1)
    assert shared.length == int(counts.max())
    assert shared.mask.sum(1).tolist() == counts.tolist()
    for row in range(3):
        old = kept[row].nonzero().squeeze(1)
        new = shared.real_columns(row)
        # left padded: the real columns are the last ones
        assert new.tolist() == list(range(shared.length - len(old), shared.length))
        # original order kept
        assert torch.all(shared.positions[row, new][1:] > shared.positions[row, new][:-1])
        for name in ("positions", "token_ids", "segment_ids"):
            assert torch.equal(getattr(shared, name)[row, new], before[name][row, old]), name
        assert (shared.positions[row, ~shared.mask[row]] == -1).all()
        assert (shared.token_ids[row, ~shared.mask[row]] == PAD).all()
        for layer, keys, values in zip(shared.cache.layers, before["keys"], before["values"]):
            assert torch.equal(layer.keys[row][:, new], keys[row][:, old])
            assert torch.equal(layer.values[row][:, new], values[row][:, old])
    assert all(layer.keys.shape[2] == shared.length for layer in shared.cache.layers)
    assert shared.cache.get_seq_length() == shared.length
    # positions keep counting from where they were, not from the trimmed length
    next_positions = shared.next_position.clone()
    shared.extend(tiny_lm.model.get_input_embeddings()(torch.tensor([[5]] * 3)), torch.ones(3, 1, dtype=torch.bool),
                  torch.tensor([[5]] * 3), SegmentKey("critic", "prompt"))
    assert torch.equal(shared.positions[:, -1], next_positions)


def test_keep_then_extend_matches_row_alone(tiny_lm):
    """After a trim, a left-padded row's next columns equal those of the same row trimmed alone."""
    rows = _random_rows(tiny_lm, [9, 5], seed=4)
    batched = _filled_cache(tiny_lm, rows, latent_steps=1)
    keep = torch.rand(2, batched.length, generator=torch.Generator().manual_seed(8)) < 0.6
    keep[:, -1] = True
    alone = _filled_cache(tiny_lm, rows[1:], latent_steps=1)
    alone.keep(keep[1:, batched.length - alone.length:])
    batched.keep(keep)
    assert batched.mask.sum(1)[1] == alone.mask.sum()
    embed = tiny_lm.model.get_input_embeddings()
    ids = torch.tensor([[7, 8, 9]] * 2)
    ones = torch.ones(2, 3, dtype=torch.bool)
    out = batched.extend(embed(ids), ones, ids, SegmentKey("critic", "prompt"))
    out_alone = alone.extend(embed(ids[:1]), ones[:1], ids[:1], SegmentKey("critic", "prompt"))
    torch.testing.assert_close(out[1], out_alone[0], atol=1e-5, rtol=0)
    new, old = batched.real_columns(1), alone.real_columns(0)
    assert torch.equal(batched.positions[1, new], alone.positions[0, old])
    for layer, layer_alone in zip(batched.cache.layers, alone.cache.layers):
        torch.testing.assert_close(layer.keys[1][:, new], layer_alone.keys[0][:, old], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- batch independence


def _compare_rows(batched: Recorder, singles: list[Recorder], atol=1e-5):
    for problem_index, single in enumerate(singles):
        assert len(single.events) == len(batched.events) == 3
        for batch_event, single_event in zip(batched.events, single.events):
            assert (batch_event["from"], batch_event["to"]) == (single_event["from"], single_event["to"])
            b, s = batch_event["rows"][problem_index], single_event["rows"][0]
            where = f"problem {problem_index + 1} at {batch_event['from']}->{batch_event['to']}"
            same_positions = torch.equal(b["positions"], s["positions"])
            same_tokens = torch.equal(b["token_ids"], s["token_ids"])
            same_segments = b["segments"] == s["segments"]
            assert same_positions and same_tokens and same_segments, f"kept columns differ for {where}"
            for layer, (kb, ks) in enumerate(zip(b["keys"], s["keys"])):
                torch.testing.assert_close(kb, ks, atol=atol, rtol=0, msg=f"keys, layer {layer}, {where}")
            for layer, (vb, vs) in enumerate(zip(b["values"], s["values"])):
                torch.testing.assert_close(vb, vs, atol=atol, rtol=0, msg=f"values, layer {layer}, {where}")


KNN_CASES = [
    pytest.param(None, id="no-knn"),
    pytest.param("top", id="knn-top"),
    pytest.param("bottom", id="knn-bottom"),
    pytest.param("random", id="knn-random"),
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", KNN_CASES)
def test_batch_independence(tiny_lm, fake_problems, strategy):
    problems = fake_problems()
    knn = dict(knn_filter=True, knn_strategy=strategy, knn_percentage=0.5, knn_min_keep=5) if strategy else {}
    cfg = tiny_config(latent_steps=3, max_new_tokens=8, generate_bs=3, **knn)
    solve = get_method("latent_mas")
    batched = Recorder()
    batch_results = solve(tiny_lm, problems, TASK, cfg, observer=batched)
    assert len(set(batched.events[0]["lengths"])) == 3  # rows really are padded differently
    singles, single_results = [], []
    for problem in problems:
        recorder = Recorder()
        single_results += solve(tiny_lm, [problem], TASK, tiny_config(**{**cfg.to_dict(), "generate_bs": 1}),
                                observer=recorder)
        singles.append(recorder)
    if strategy:
        # kNN really trimmed something
        lengths = prompt_lengths(tiny_lm, problems, cfg)
        untrimmed = [lengths["planner"][b] + 3 for b in range(3)]
        assert batched.events[0]["lengths"] != untrimmed
    _compare_rows(batched, singles)
    assert [r.output for r in batch_results] == [r.output for r in single_results]
    assert [r.agents[-1].output_tokens for r in batch_results] == [r.agents[-1].output_tokens for r in single_results]
    assert all(r.agents[-1].output_tokens >= 1 for r in batch_results)


@pytest.mark.slow
def test_sampling_is_batch_independent(tiny_lm, fake_problems):
    problems = fake_problems()
    cfg = tiny_config(latent_steps=2, max_new_tokens=8, temperature=1.0, top_p=0.9)
    solve = get_method("latent_mas")
    batched = [r.output for r in solve(tiny_lm, problems, TASK, cfg)]
    single = [solve(tiny_lm, [p], TASK, cfg)[0].output for p in problems]
    assert batched == single
    again = [r.output for r in solve(tiny_lm, problems, TASK, cfg)]
    assert again == batched


# --------------------------------------------------------------------------- layer similarities


def reference_similarities(keys, query):
    """The four steps, one layer and one problem at a time, in fp32."""
    batch = query.shape[0]
    out = torch.empty(batch, len(keys), keys[0].shape[2])
    for layer, k in enumerate(keys):
        head_dim = k.shape[-1]
        for b in range(batch):
            mean_keys = k[b].float().mean(dim=0)  # [T, D]
            q = query[b].float().view(query.shape[1] // head_dim, head_dim).mean(dim=0)  # [D]
            dots = mean_keys @ q
            norms = mean_keys.norm(dim=-1).clamp_min(1e-8) * q.norm().clamp_min(1e-8)
            out[b, layer] = dots / norms
    return out


@pytest.mark.parametrize("hidden, kv_heads, head_dim", [(2560, 8, 128), (1024, 8, 128), (64, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_similarities_match_a_plain_loop(hidden, kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(hidden + kv_heads)
    batch, T, layers = 2, 50, 3
    # a shared offset makes the cosines spread over a real range, not all near 0
    offset = 0.2 * torch.randn(head_dim, generator=g)
    keys = [(torch.randn(batch, kv_heads, T, head_dim, generator=g) + offset).to(dtype) for _ in range(layers)]
    query = (torch.randn(batch, hidden, generator=g) + offset.repeat(hidden // head_dim)).to(dtype)
    got = layer_similarities(keys, query)
    assert got.dtype == torch.float32 and got.shape == (batch, layers, T)
    want = reference_similarities(keys, query)
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=0)
    assert got.abs().max() <= 1 + 1e-6
    assert got.std() > 0.05, got.std()


def test_layer_similarities_in_groups_of_layers_equal_one_layer_at_a_time(monkeypatch):
    """Layers go in groups whose fp32 head means fit SEED_GROUP_ELEMENTS; any grouping (one layer per
    group, uneven groups, all at once) gives the same values, to the bit."""
    g = torch.Generator().manual_seed(5)
    batch, kv_heads, T, head_dim = 2, 4, 30, 16
    offset = 0.3 * torch.randn(head_dim, generator=g)
    keys = [(torch.randn(batch, kv_heads, T, head_dim, generator=g) + offset).to(torch.bfloat16) for _ in range(7)]
    query = torch.randn(batch, 3 * head_dim, generator=g) + offset.repeat(3)
    per_layer = batch * T * head_dim
    results = []
    for layers_per_group in (1, 3, 7):
        monkeypatch.setattr(maths, "SEED_GROUP_ELEMENTS", layers_per_group * per_layer)
        results.append(layer_similarities(keys, query))
    for got in results[1:]:
        assert torch.equal(got, results[0])
    torch.testing.assert_close(results[0], reference_similarities(keys, query), atol=1e-3, rtol=0)
    assert results[0].std() > 0.05


def test_layer_similarities_dispatch_a_few_ops_not_a_few_per_layer():
    """All of a small cache's layers are one group: about one op per layer (its head mean) and a few for
    the cosines, not the ~14 per layer (508 for 36 layers) that took 4 ms per hand-off at batch size 1 on an H200."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    keys = [torch.randn(1, 8, 40, 128, dtype=torch.bfloat16) for _ in range(36)]
    with Count():
        layer_similarities(keys, torch.randn(1, 2560))
    assert Count.ops <= 36 + 25, Count.ops


def test_layer_similarities_extremes():
    keys = torch.randn(1, 2, 4, 8)
    keys[:, :, 1] = -keys[:, :, 0]
    # the query reduces to the head-mean of column 0
    query = keys[:, :, 0].mean(dim=1).repeat(1, 3)  # hidden 24 = 3 chunks of 8
    sims = layer_similarities([keys], query)
    torch.testing.assert_close(sims[0, 0, :2], torch.tensor([1.0, -1.0]), atol=1e-5, rtol=0)


def test_layer_similarities_errors():
    keys = [torch.randn(1, 2, 5, 128)]
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        layer_similarities(keys, torch.randn(1, 2500))
    with pytest.raises(ValueError, match="not a multiple"):
        reduce_query(torch.randn(2, 100), 16)
    with pytest.raises(ValueError, match="unknown similarity mode 'other'; choose from seed, query, attention"):
        get_mode("other")
    with pytest.raises(ValueError, match="at least one layer"):
        layer_similarities([], torch.randn(1, 256))
    with pytest.raises(ValueError, match="one batch, T and head_dim"):
        layer_similarities([torch.randn(1, 2, 5, 128), torch.randn(1, 2, 6, 128)], torch.randn(1, 256))


def test_middle_layer_scores_drive_the_knn(tiny_lm, fake_problems):
    """The kNN keeps, after the planner, exactly what keep_mask picks from the middle layer's similarities."""
    problems = fake_problems()[:2]
    cfg = tiny_config(latent_steps=2, max_new_tokens=1, knn_filter=True, knn_percentage=0.4, knn_min_keep=3)
    plain, trimmed = Recorder(), Recorder()
    get_method("latent_mas")(tiny_lm, problems, TASK, tiny_config(latent_steps=2, max_new_tokens=1), observer=plain)
    get_method("latent_mas")(tiny_lm, problems, TASK, cfg, observer=trimmed)
    knn = KnnFilter(0.4, 3, "top")
    middle = tiny_lm.num_layers // 2
    for b in range(2):
        row = plain.events[0]["rows"][b]
        keys = row["keys"][middle][None]  # [1, kv, T, D]
        scores = layer_similarities([keys], row["query"][None])[:, 0]
        keep = knn.keep_mask(scores, torch.ones_like(scores, dtype=torch.bool))[0]
        kept_positions = row["positions"][keep]
        assert torch.equal(trimmed.events[0]["rows"][b]["positions"], kept_positions)
