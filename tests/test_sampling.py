"""latentmas.sampling: counter-based noise, the fused sampling step and the Sampler built on it."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from latentmas import sampling
from latentmas.decoding import Sampling, problem_generators
from latentmas.sampling import (
    Sampler,
    counter_uniform,
    mix64,
    row_keys_of,
    sample_tokens,
    shift_right,
    unit_from_bits,
    warp_logits,
)

MASK64 = (1 << 64) - 1


def transformers_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """`[batch, vocab]` -> `[batch, vocab]` through transformers' own warpers, in generate's order."""
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for warp in warpers:
        logits = warp(None, logits)
    return logits


def tied_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits `[batch, vocab]` on a coarse grid (steps of 0.5), so that most rows hold ties."""
    return (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 2).round() / 2


def _python_mix64(x: int) -> int:
    """splitmix64's finaliser on unsigned 64-bit Python ints (the reference for mix64)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


# --------------------------------------------------------------------------- the hash


def test_shift_right_and_mix64_match_unsigned_64_bit_arithmetic():
    rng = random.Random(3)
    values = [0, 1, -1, 2**63 - 1, -(2**63), -2, 12345] + [rng.randrange(-(2**63), 2**63) for _ in range(500)]
    x = torch.tensor(values, dtype=torch.int64)
    for bits in (1, 27, 30, 31, 41, 63):
        assert [v & MASK64 for v in shift_right(x, bits).tolist()] == [(v & MASK64) >> bits for v in values]
    assert [v & MASK64 for v in mix64(x).tolist()] == [_python_mix64(v) for v in values]


def test_unit_from_bits_stays_strictly_inside_zero_and_one():
    bits = torch.tensor([0, -1, 2**63 - 1, -(2**63), 1, -2], dtype=torch.int64)
    u = unit_from_bits(bits)
    assert u.dtype == torch.float32
    assert bool(((u > 0) & (u < 1)).all())
    assert float(u.min()) == 2.0**-24 and float(u.max()) == 1 - 2.0**-24
    race = -u.log()
    assert bool((torch.isfinite(race) & (race > 0)).all())


def test_counter_uniform_is_uniform_over_tokens_rows_and_steps():
    keys = torch.arange(64, dtype=torch.int64) * 7919 + 11
    u = counter_uniform(keys, torch.tensor([5]), 4096)  # [64, 4096]
    assert u.shape == (64, 4096) and u.dtype == torch.float32
    assert bool(((u > 0) & (u < 1)).all())
    flat = u.flatten().double()
    n = flat.numel()
    assert abs(float(flat.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(flat.var()) - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # var of (u - 1/2)^2 is 1/180
    assert stats.kstest(flat.numpy(), "uniform").pvalue > 1e-3
    # no correlation between neighbouring tokens, neighbouring rows (keys k, k + 7919) ...
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 5 / n**0.5
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 5 / n**0.5
    # ... or neighbouring steps of one row; and one token over many steps is uniform too
    steps = torch.arange(20000, dtype=torch.int64)
    over_steps = counter_uniform(torch.full((20000,), 42, dtype=torch.int64), steps, 3)  # [steps, 3]
    assert stats.kstest(over_steps[:, 1].double().numpy(), "uniform").pvalue > 1e-3
    column = over_steps[:, 0].double()
    assert abs(float(torch.corrcoef(torch.stack([column[:-1], column[1:]]))[0, 1])) < 5 / 20000**0.5


def test_counter_uniform_is_a_pure_function_of_key_step_and_token():
    keys = torch.tensor([3, -5, 2**62, 3], dtype=torch.int64)
    u = counter_uniform(keys, torch.tensor([9]), 300)
    assert torch.equal(u, counter_uniform(keys, torch.tensor([9]), 300))
    assert torch.equal(u[0], u[3])  # same key, same step: same noise
    assert torch.equal(u[:, :100], counter_uniform(keys, torch.tensor([9]), 100))  # token i's value ignores vocab
    for r in range(4):
        assert torch.equal(u[r:r + 1], counter_uniform(keys[r:r + 1], torch.tensor([9]), 300))
    assert float((u[0] == u[1]).float().mean()) < 0.01  # different keys: different noise
    assert float((u == counter_uniform(keys, torch.tensor([10]), 300)).float().mean()) < 0.01  # different steps
    per_row = counter_uniform(keys, torch.tensor([0, 9, 4, 9]), 300)  # one step per row
    assert torch.equal(per_row[1], u[1]) and torch.equal(per_row[3], u[3])
    assert torch.equal(per_row[2:3], counter_uniform(keys[2:3], torch.tensor([4]), 300))


def test_bad_inputs_say_what_was_wrong():
    keys, step, logits = torch.tensor([1, 2]), torch.tensor([0]), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="row_keys must be int64"):
        counter_uniform(keys.int(), step, 5)
    with pytest.raises(ValueError, match="step must be an int64 tensor"):
        counter_uniform(keys, torch.tensor(0), 5)
    with pytest.raises(ValueError, match="logits must be"):
        sample_tokens(logits[0], keys, step, 1.0)
    with pytest.raises(ValueError, match="top_k must be"):
        sample_tokens(logits, keys, step, 1.0, top_k=-1)
    with pytest.raises(ValueError, match="top_p must be"):
        sample_tokens(logits, keys, step, 1.0, top_p=1.5)
    with pytest.raises(ValueError, match="one generator per row"):
        row_keys_of([])


# --------------------------------------------------------------------------- the kept set


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (0.7, 0, 0.9),
    (1.3, 5, 0.8),
    (1.0, 3, 1.0),  # top-p off
    (0.5, 0, 1.0),  # neither cut
    (1.0, 500, 0.95),  # top_k > vocab
    (2.0, 4, 0.0),  # top_p 0 keeps only the most likely
    (0.3, 1, 0.5),
])
def test_warp_keeps_what_transformers_keeps(temperature, top_k, top_p):
    logits = tied_logits(32, 64, seed=top_k * 10 + 1)
    ours = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(ours, transformers_warp(logits, temperature, top_k, top_p))
    assert bool(torch.isfinite(ours).any(dim=-1).all())  # at least one token kept per row


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [sampling.SCAN_WIDTH, 3000, 151936])
def test_cumulative_sum_in_slices_is_a_cumulative_sum_row_by_row(vocab, device):
    """The two-level scan against float64's cumsum, over widths that end inside a slice and on one; on
    the CPU each row of a batch is summed exactly as that row alone (on CUDA torch's scan kernels
    chunk by the number of rows, so only closeness is asked there)."""
    x = torch.rand(5, vocab, generator=torch.Generator().manual_seed(vocab)).to(device)
    x = x / x.sum(-1, keepdim=True)
    ours = sampling._cumulative_sum(x)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours.double(), x.double().cumsum(-1), rtol=0, atol=2e-6)
    for row in range(5):
        alone = sampling._cumulative_sum(x[row:row + 1])
        if device == "cpu":
            assert torch.equal(ours[row:row + 1], alone)
        else:
            torch.testing.assert_close(ours[row:row + 1], alone, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "top_k"), [(torch.bfloat16, 0), (torch.bfloat16, 700), (torch.float16, 0)])
def test_top_p_on_16_bit_sort_keys_drops_what_the_float32_sort_drops(dtype, top_k, device):
    """Sorting the model's 16-bit logits gives top-p the order (ties included) of sorting the float32
    warped ones: the same kept set, and so the same draws, on rows full of ties and -inf."""
    logits = (torch.randn(6, 5000, generator=torch.Generator().manual_seed(7)) * 3).to(device, dtype)
    logits[0, :300] = -float("inf")
    logits[1] = logits[1].round()  # a row of few distinct values: ties at any cut
    assert len(torch.unique(logits[2])) < 4500  # 16-bit logits tie everywhere
    for temperature, top_p in ((0.6, 0.95), (1.3, 0.5), (0.9, 0.999)):
        fp32 = warp_logits(logits.float(), temperature, top_k, top_p)
        assert torch.equal(warp_logits(logits.float(), temperature, top_k, top_p, sort_keys=logits), fp32)
        assert bool((torch.isinf(fp32) & torch.isfinite(logits.float())).any())  # the cut dropped some
        keys = torch.arange(6, dtype=torch.int64, device=device) * 11 + 3
        step = torch.tensor([5], device=device)
        assert torch.equal(sample_tokens(logits, keys, step, temperature, top_k, top_p),
                           sample_tokens(logits.float(), keys, step, temperature, top_k, top_p))
    with pytest.raises(ValueError, match="sort_keys must be bfloat16 or float16"):
        warp_logits(logits.float(), 0.6, 0, 0.9, sort_keys=logits.float())


def test_warp_ties_and_cuts_by_hand():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    kept = torch.isfinite(warp_logits(logits, 1.0, 2, 1.0))[0].tolist()
    assert kept == [True, True, True, True, False]  # every tie at the k-th score stays
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(warp_logits(probs, 1.0, 0, 0.7))[0].tolist() == [True, True, False]
    assert torch.isfinite(warp_logits(probs, 1.0, 0, 0.0))[0].tolist() == [True, False, False]
    assert torch.isfinite(warp_logits(probs, 1.0, 7, 1.0)).all()  # k capped at the vocabulary


def test_sampled_tokens_are_always_ones_the_warpers_keep():
    logits = tied_logits(8, 50, seed=5).repeat(100, 1)  # [800, 50]: 8 rows x 100 draws
    keys = torch.arange(800, dtype=torch.int64) % 8
    steps = torch.arange(800, dtype=torch.int64) // 8
    for temperature, top_k, top_p in [(0.8, 6, 0.9), (1.5, 0, 0.7), (1.0, 60, 0.95), (3.0, 2, 1.0)]:
        tokens = sample_tokens(logits, keys, steps, temperature, top_k, top_p)
        warped = transformers_warp(logits, temperature, top_k, top_p)
        assert bool(torch.isfinite(warped.gather(1, tokens[:, None])).all())


FREQUENCY_CASES = [
    # (logits of one row (with ties), temperature, top_k, top_p)
    ([1.0, 0.5, 0.5, 0.0, -0.5, -1.0, 2.0, 0.5], 0.8, 0, 0.9),
    ([1.0, 0.5, 0.5, 0.0, -0.5, -1.0, 2.0, 0.5], 1.5, 4, 1.0),
    ([0.2, 0.2, 0.1, 0.0, 0.3, 0.3], 0.5, 5, 0.95),
    ([0.0, 0.0, 0.0, 0.0], 1.0, 0, 1.0),
]


@pytest.mark.parametrize(("row", "temperature", "top_k", "top_p"), FREQUENCY_CASES)
def test_draws_follow_the_warped_softmax(row, temperature, top_k, top_p):
    """Over many steps of one row (and over many rows at one step) each kept token is drawn with
    its warped-softmax probability (chi-square), each dropped one never; the same check rejects
    the softmax without the cuts, so it has the power to fail."""
    draws = 40_000
    logits = torch.tensor([row]).expand(draws, -1)
    expected = transformers_warp(torch.tensor([row]), temperature, top_k, top_p).softmax(-1)[0].double()
    expected = expected / expected.sum()  # float32 softmax sums to 1 only within rounding
    kept = expected > 0
    over_steps = sample_tokens(logits, torch.full((draws,), 1234, dtype=torch.int64),
                               torch.arange(draws, dtype=torch.int64), temperature, top_k, top_p)
    over_rows = sample_tokens(logits, torch.arange(draws, dtype=torch.int64) * 31 + 7, torch.tensor([17]),
                              temperature, top_k, top_p)
    uncut = torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, -1)
    for tokens in (over_steps, over_rows):
        counts = torch.bincount(tokens, minlength=len(row)).double()
        assert counts[~kept].sum() == 0
        if int(kept.sum()) > 1:
            assert stats.chisquare(counts[kept], expected[kept] * draws).pvalue > 1e-4
        if not torch.equal(kept, uncut > 0) or not torch.allclose(uncut, expected):
            assert stats.chisquare(counts, uncut * draws).pvalue < 1e-6


def test_greedy_is_argmax():
    logits = tied_logits(16, 40, seed=2)
    keys, step = torch.arange(16, dtype=torch.int64), torch.tensor([3])
    for temperature in (0.0, -1.0):
        assert torch.equal(sample_tokens(logits, keys, step, temperature, 5, 0.5), logits.argmax(-1))
    sampler = Sampler(Sampling(temperature=0.0), problem_generators(list(range(16)), 0, torch.device("cpu")))
    assert torch.equal(sampler(logits.half()), logits.half().float().argmax(-1))


# --------------------------------------------------------------------------- batching and the Sampler


def test_a_rows_tokens_do_not_depend_on_its_batch():
    generators = problem_generators([3, 1, 4, 15, 9], 7, torch.device("cpu"))
    keys = row_keys_of(generators)
    assert keys.tolist() == [7 * 1_000_003 + n for n in (3, 1, 4, 15, 9)]
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    for step in range(20):
        step_t = torch.tensor([step])
        batch = sample_tokens(logits, keys, step_t, 1.2, 20, 0.9)
        assert torch.equal(batch, sample_tokens(logits, keys, step_t, 1.2, 20, 0.9))  # same keys+step
        for r in range(5):
            assert torch.equal(batch[r:r + 1], sample_tokens(logits[r:r + 1], keys[r:r + 1], step_t, 1.2, 20, 0.9))
    assert torch.equal(logits, original)  # the caller's logits are never written


def test_sampler_advances_its_step_and_a_problem_draws_the_same_in_any_batch():
    sampling = Sampling(temperature=2.0, top_p=0.95, top_k=0)
    cpu = torch.device("cpu")
    together = Sampler(sampling, problem_generators([1, 2, 3], 0, cpu))
    alone = Sampler(sampling, problem_generators([2], 0, cpu))
    logits = torch.zeros(3, 50)  # flat: every step's draw is a fresh uniform pick
    drawn = []
    for _ in range(30):
        both = together(logits)
        assert torch.equal(both[1:2], alone(logits[1:2]))
        drawn.append(int(both[1]))
    assert int(together.step) == 30 == int(alone.step)
    assert len(set(drawn)) > 10  # the counter moves: not one token over and over
    owned = torch.tensor([4])
    assert torch.equal(together.sample(logits, owned), sample_tokens(logits, together.keys, owned, 2.0, 0, 0.95))
    assert int(together.step) == 30  # sample() leaves the internal counter alone


# --------------------------------------------------------------------------- graphs


def _has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor needs a C++ compiler on the CPU")
def test_compiled_sampler_draws_what_eager_draws():
    """The compiled sampler breaks its graph once, at top-p's cumulative sum (inductor cannot generate it
    at the vocabulary's size), and nowhere else (no host syncs such as .item(), no Python loops over
    data); a new step value must not recompile (the step is read from the tensor)."""
    from latentmas.sampling import compiled_sampler

    torch._dynamo.reset()
    logits = tied_logits(8, 64, seed=9)
    keys = torch.arange(8, dtype=torch.int64) * 3 - 5
    step = torch.tensor([0])
    breaks = torch._dynamo.explain(sample_tokens)(logits, keys, step, 0.7, 5, 0.9).break_reasons
    assert breaks and all("_cumulative_sum" in b.reason for b in breaks)  # (counted once per frame it crosses)
    assert torch._dynamo.explain(sample_tokens)(logits, keys, step, 0.7, 5, 1.0).graph_break_count == 0
    torch._dynamo.reset()
    compiled = compiled_sampler()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            assert torch.equal(compiled(logits, keys, step, 0.7, 5, 0.9), sample_tokens(logits, keys, step, 0.7, 5, 0.9))
            step += 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_runs_inside_a_captured_cuda_graph():
    device = torch.device("cuda")
    logits = tied_logits(16, 1000, seed=4).to(device)
    keys = (torch.arange(16, dtype=torch.int64) * 13).to(device)
    step = torch.zeros(1, dtype=torch.int64, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_tokens(logits, keys, step, 0.8, 50, 0.9)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample_tokens(logits, keys, step, 0.8, 50, 0.9)
        step += 1
    for expected_step in range(5):
        graph.replay()
        eager = sample_tokens(logits, keys, torch.tensor([expected_step], device=device), 0.8, 50, 0.9)
        assert torch.equal(tokens, eager)
        assert int(step) == expected_step + 1
    noise = counter_uniform(keys, torch.tensor([4], device=device), 1000)
    assert torch.equal(noise.cpu(), counter_uniform(keys.cpu(), torch.tensor([4]), 1000))  # same bits on both devices


@pytest.mark.parametrize("vocab", [1, 7, 130, 1000, 151936])
@pytest.mark.parametrize("slices", [1, 3, 128, 5000])
def test_first_argmax_is_argmax_ties_included(vocab, slices):
    """The sliced argmax returns argmax's index (the first largest), also where values tie within and
    across slices and where the vocabulary does not divide into the slices (padded with -inf)."""
    from latentmas.sampling import first_argmax

    generator = torch.Generator().manual_seed(vocab + slices)
    for scores in (torch.randn(4, vocab, generator=generator),
                   torch.randint(0, 3, (4, vocab), generator=generator).float(),  # ties everywhere
                   torch.full((4, vocab), -2.5)):  # one value: index 0
        assert torch.equal(first_argmax(scores, slices), scores.argmax(dim=-1))
