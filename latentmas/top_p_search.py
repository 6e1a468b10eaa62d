"""Top-p without a sort: the cut found by searching the 16-bit key space, for the compiled sampler.

Sorted ascending, transformers' top-p warper drops every token whose cumulative probability is <= 1 -
top_p and keeps the last (`sampling.warp_logits`). With the model's bfloat16 / float16 logits as sort
keys (the keys' order is the probabilities' order, `warp_logits`), that dropped set is a prefix of the
tokens in the sort's order. On CUDA torch sorts a row this long with a radix sort, which keeps tied
keys in index order, so the set is a prefix in (key, token index) order (on the CPU torch's sort orders
ties its own way: there the eager sampler may drop other tokens of a tie at the cut than this does;
the tests compare with a stable sort there). So it is fixed by two numbers a row: the key v of the
first token kept, and how many of the tokens tied at v come before it.
Both are found with reductions over the row instead of a sort:

- v is the largest key whose mass below it (the probabilities of the tokens with smaller keys) is <=
  1 - top_p. That mass only grows with v, so a search over the 65,536 ordered 16-bit codes finds v: in
  each of four rounds 15 thresholds split the range left into 16 parts (`RADIX`), 15 sums over the row
  that the compiler fuses into one pass;
- the tokens tied at v, q each, are dropped while below + (j + 1) q <= 1 - top_p (j = 0, 1, ...): n of
  them, never all of the row's largest. The n-th tied token in index order is found through counts
  per slice of the row (`sampling.SCAN_WIDTH`) and one slice's running count.

The sums round differently from the sorted cumulative sum (as `sampling._cumulative_sum`'s slices
already do), so a token within float32 rounding of the cut can fall the other way; elsewhere the set is
the sort's (tests/test_top_p_search.py compares them on rows full of ties). -0.0 and +0.0 count as one key.

Eagerly this is some 200 kernels over the row, so only the compiled sampler may take it (`wanted`). It
is off (`ENABLED`): it was meant to replace the segmented radix sort, its cumulative sum and the scatter
(at batch size 16 about 0.4 of the sampler's 0.56 ms a step on an H200, stop 22), but on an H200
(2026-12-04, stop 27) it was slower where that cost is largest. The compiled, graph-replayed step with
sampling (`bench/decode_probe.py --compile_step --top_p search,sort`, 154 cached columns, ms a step,
three timings of 100 steps): batch size 1 3.368 / 3.374 / 3.375 searching against 3.383 / 3.389 / 3.390
sorting; 16: 4.371 / 4.415 / 4.460 against 4.268 / 4.312 / 4.356; 64: 5.956 / 6.236 / 6.490 against
5.498 / 5.779 / 6.031. The sampler alone at 64 (`bench/sampling_probe.py`): 1,368.9 µs a draw against
964.0, the same picks in all 2,048 draws. Why was not profiled (the probe then profiled only its last
case). On the CPU inductor fuses the whole search into three kernels (`cpp_fused_*`), each a loop nest
per row; on CUDA such fusion would leave one program per row for each pass over 151,936 tokens, which
fits the slowdown growing with the batch, but is a guess until `bench/sampling_probe.py --searched_top_p
--profile` runs.
"""

from __future__ import annotations

import torch

RADIX = 16  # parts a search round splits the codes left into: 4 rounds of 15 sums cover 16 bits
CODES = 1 << 16
ENABLED = False  # True: the compiled sampler searches (slower on an H200, see above)


def wanted(sort_keys: torch.Tensor | None) -> bool:
    """Whether top-p should search: 16-bit sort keys, while torch.compile traces the sampler."""
    return ENABLED and sort_keys is not None and torch.compiler.is_compiling()


def ordered_codes(keys: torch.Tensor) -> torch.Tensor:
    """bfloat16 / float16 `[batch, vocab]` -> int32 `[batch, vocab]` in [-32768, 32767], in the keys'
    order: a float's bits as int16, the 15 low bits flipped where the sign is set; -0.0 made +0.0."""
    bits = keys.view(torch.int16).to(torch.int32)
    codes = torch.where(bits < 0, bits ^ 0x7FFF, bits)
    return torch.where(codes == -1, 0, codes)  # -0.0's code sits just below +0.0's


def _mass_below(probs: torch.Tensor, codes: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row `[batch]`: the probability of the tokens whose code is < threshold `[batch]`."""
    return torch.where(codes < threshold[:, None], probs, 0.0).sum(dim=-1)


def top_p_drops(probs: torch.Tensor, keys: torch.Tensor, top_p: float, width: int = 1024) -> torch.Tensor:
    """What top-p drops, bool `[batch, vocab]`, from the warped softmax `probs` float32 `[batch, vocab]`
    and the 16-bit keys `[batch, vocab]` it is increasing in (the model's logits, -inf where top-k cut).

    width: the slice width for finding the n-th tied token (`sampling.SCAN_WIDTH`)."""
    batch, vocab = probs.shape
    codes = ordered_codes(keys)
    room = 1.0 - top_p
    low = torch.full((batch,), -CODES // 2, dtype=torch.int32, device=probs.device)  # mass below it: 0 <= room
    step = CODES
    while step > 1:
        step //= RADIX
        passed = sum(_mass_below(probs, codes, low + k * step) <= room for k in range(1, RADIX))
        low = low + passed.to(torch.int32) * step
    cut = torch.minimum(low, codes.amax(dim=-1))  # the first kept token's code; past the row's largest
    #                                               only when rounding leaves its total mass <= room
    below = _mass_below(probs, codes, cut)
    tied = codes == cut[:, None]  # [batch, vocab]
    count = tied.sum(dim=-1)
    each = torch.where(tied, probs, 0.0).amax(dim=-1)
    fits = torch.where(each > 0, torch.floor((room - below).clamp_min(0) / each), count.to(probs.dtype))
    dropped_ties = torch.minimum(fits.to(torch.int64), count - 1).clamp_min(0)  # [batch]: keeps >= 1
    first_kept = _nth_true(tied, dropped_ties, width)
    index = torch.arange(vocab, device=probs.device)
    return (codes < cut[:, None]) | (tied & (index < first_kept[:, None]))


def _nth_true(mask: torch.Tensor, n: torch.Tensor, width: int) -> torch.Tensor:
    """Per row `[batch]`: the index of the n-th (from 0) True of bool `mask` `[batch, vocab]`, which
    must exist; counted a slice of `width` at a time, then within the slice that holds it."""
    batch, vocab = mask.shape
    slices = -(-vocab // width)
    padded = torch.nn.functional.pad(mask.to(torch.int32), (0, slices * width - vocab)).view(batch, slices, width)
    per_slice = padded.sum(dim=-1)  # [batch, slices]
    through = per_slice.cumsum(dim=-1)  # [batch, slices]: Trues up to each slice's end
    where = (through <= n[:, None]).sum(dim=-1, keepdim=True)  # [batch, 1]: the slice holding it
    earlier = through.gather(1, where) - per_slice.gather(1, where)  # [batch, 1]
    rows = padded.gather(1, where[:, :, None].expand(batch, 1, width))[:, 0]  # [batch, width]
    within = (rows.cumsum(dim=-1) <= n[:, None] - earlier).sum(dim=-1)  # [batch]
    return where[:, 0] * width + within
