"""Graph-capturable sampling: counter-based noise and a fused temperature / top-k / top-p step.

Each row's noise is a pure function of (row key, step, token index) through a splitmix64 hash
written in torch int64 ops (multiplications wrap, right shifts are made logical by masking), so
one step is a fixed set of tensor ops: no Python loop over rows, no host sync, no
data-dependent shapes. It runs in eager on the CPU and CUDA, under `torch.compile` (whole graph
but for top-p's cumulative sum, see `compiled_sampler`)
and inside a captured CUDA graph (the step counter is a device tensor the graph reads).

A row's key comes from its problem's generator seed (`row_keys_of`), so a problem's draws never
depend on the batch it is decoded in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .decoding import Sampling

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern (Python int) as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 (Steele, Lea, Flood 2014): the stream increment and the finaliser's multipliers.
GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX_A = _signed(0xBF58476D1CE4E5B9)
_MIX_B = _signed(0x94D049BB133111EB)
UNIT_BITS = 23  # bits per uniform: (m + 0.5) / 2**23 is exact in float32 and never 0 or 1


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 `x` (any shape) by `bits` in 1..63: zeros come in from the left.

    torch's `>>` on int64 is arithmetic (copies the sign bit); masking the shifted value clears
    those copies.
    """
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _shift_right_into(x: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """`shift_right(x, bits)` written into `out` (same shape and dtype as x); returns out."""
    return torch.bitwise_right_shift(x, bits, out=out).bitwise_and_((1 << (64 - bits)) - 1)


def _mix64_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """`mix64` in place on x, using `scratch` (same shape) as work space: no allocation, which
    makes eager CPU noise several times faster; the compiler sees the same maths."""
    for bits, multiplier in ((30, _MIX_A), (27, _MIX_B), (31, None)):
        x ^= _shift_right_into(x, bits, scratch)
        if multiplier is not None:
            x *= multiplier
    return x


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 `x` (any shape) -> int64, same shape: a bijection of 64-bit
    patterns. (x ^= x >>> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >>> 27; x *= 0x94D049BB133111EB;
    x ^= x >>> 31, all mod 2**64.)"""
    return _mix64_(x.clone(), torch.empty_like(x))


def unit_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 hash values (any shape) -> float32 in (0, 1), same shape: the top UNIT_BITS bits m, as
    (m + 0.5) / 2**UNIT_BITS (exact in float32; the extremes are 2**-24 and 1 - 2**-24)."""
    top = shift_right(bits, 64 - UNIT_BITS).to(torch.float32)
    return top.add_(0.5).mul_(2.0 ** -UNIT_BITS)


def counter_uniform(row_keys: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise `[batch, vocab]` float32 in (0, 1), each value a pure function of
    (row key, step, token index).

    row_keys: int64 `[batch]`. step: int64 `[1]` (one step for all rows) or `[batch]`, a device
    tensor so that a captured graph reads it from memory. Row r's seed for a step is
    s = mix64(mix64(key_r) + step * GOLDEN) (splitmix64's stream over steps); token i draws
    mix64(mix64(s + i)). The token index is never multiplied by a large constant: inductor's
    C++ backend turns `arange * GOLDEN` fused into a reduction into loop-index arithmetic whose
    signed overflow is undefined behaviour in C++ (here, torch 2.13 CPU, it segfaulted or
    returned wrong values); the second mix64 does the spreading that GOLDEN's increment would.
    """
    if row_keys.dtype != torch.int64 or row_keys.dim() != 1:
        raise ValueError(f"row_keys must be int64 [batch], got {row_keys.dtype} {list(row_keys.shape)}")
    if step.dtype != torch.int64 or step.dim() != 1:
        raise ValueError(f"step must be an int64 tensor [1] or [batch], got {step.dtype} {list(step.shape)}")
    seeds = mix64(mix64(row_keys) + step * GOLDEN)  # [batch]
    tokens = torch.arange(vocab, dtype=torch.int64, device=row_keys.device)  # [vocab]
    bits = seeds[:, None] + tokens[None, :]  # [batch, vocab]
    scratch = torch.empty_like(bits)
    _mix64_(_mix64_(bits, scratch), scratch)
    top = _shift_right_into(bits, 64 - UNIT_BITS, scratch).to(torch.float32)
    return top.add_(0.5).mul_(2.0 ** -UNIT_BITS)  # as unit_from_bits, without its temporaries


SORT_KEY_DTYPES = (torch.bfloat16, torch.float16)  # logits top-p may sort in place of their float32 copy


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                sort_keys: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' temperature -> top-k -> top-p warpers on float32 logits `[batch, vocab]` -> `[batch, vocab]`,
    dropped tokens set to -inf; the same ops (and so the same ties) as `TemperatureLogitsWarper`,
    `TopKLogitsWarper` and `TopPLogitsWarper` with their defaults (min_tokens_to_keep 1), but for
    top-p's cumulative sum, which is taken in slices (`_cumulative_sum`).

    top-k keeps every token whose score is >= the k-th largest (ties at the cut all stay); k is
    capped at the vocabulary; 0 = no cut. top-p sorts ascending and drops the tokens whose
    cumulative probability is <= 1 - top_p, always keeping the most likely one; 1.0 = no cut.

    sort_keys: the bfloat16 or float16 logits `logits` was made from (`logits` = sort_keys.float()),
    or None. top-p then sorts them instead: half the key bits, so half the radix passes of the
    sort, and the same order with the same ties, so the same tokens dropped. (`x.float() / temperature`
    is strictly increasing on 16-bit floats wherever the quotient neither overflows nor underflows:
    neighbours are at least 2**-11 apart, relatively, and float32's division rounds by at most 2**-24.)
    """
    if sort_keys is not None and sort_keys.dtype not in SORT_KEY_DTYPES:
        raise ValueError(f"sort_keys must be bfloat16 or float16 logits, got {sort_keys.dtype}")
    logits = logits / temperature  # a new tensor: the cuts below fill it in place
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        cut = logits < kth
        logits.masked_fill_(cut, -float("inf"))
        if sort_keys is not None:
            sort_keys = sort_keys.masked_fill(cut, -float("inf"))
    if top_p < 1.0:
        if sort_keys is None:
            ordered, order = torch.sort(logits, descending=False)
        else:
            ordered, order = torch.sort(sort_keys, descending=False)
            ordered = ordered.float() / temperature  # = logits sorted: the same op on the same values
        drop_sorted = _cumulative_sum(ordered.softmax(dim=-1)) <= 1 - top_p
        drop_sorted[..., -1:] = False
        logits.masked_fill_(drop_sorted.scatter(1, order, drop_sorted), -float("inf"))
    return logits


SCAN_WIDTH = 1024  # `_cumulative_sum`'s slice width


@torch.compiler.disable
def _cumulative_sum(x: torch.Tensor) -> torch.Tensor:
    """`x.cumsum(-1)` for `[batch, vocab]` -> `[batch, vocab]`, taken in two levels: each slice of
    SCAN_WIDTH columns on its own (the slices are the rows of one scan), then each slice's total
    carried into the slices after it. On CUDA one scan over whole rows is slow at batch sizes above
    1: in the compiled sampling step on an H200, torch's `tensor_kernel_scan_innermost_dim` over the
    batch's 151,936-token rows took 197 µs per step at batch size 16 and 245 µs at 64.

    The sums round differently from one scan over the row (sequential on the CPU), so a token whose
    cumulative probability lies within float32 rounding of top-p's cut can fall the other way than in
    transformers' warper. On the CPU a row is summed the same way at every batch size; on CUDA torch
    picks its scan kernel and chunking by the number of rows, so the rounding can depend on the batch
    size (as other GPU kernels' does, docs/faithfulness.md).
    Run eagerly under torch.compile: inductor (torch 2.11) failed to generate a scan over
    `[batch > 1, 151936]` (`SplitScan`, seen on an H200).
    """
    batch, vocab = x.shape
    within = _in_slices(x, SCAN_WIDTH, 0.0).cumsum(dim=-1)  # [batch, slices, width]
    before = torch.nn.functional.pad(within[:, :-1, -1].cumsum(dim=-1), (1, 0))  # [batch, slices]: earlier slices' mass
    return (within + before[..., None]).view(batch, -1)[:, :vocab]


def _in_slices(x: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """`[batch, vocab]` -> `[batch, slices, width]`: each row cut into runs of `width`, the last padded
    with `fill` (slices = vocab / width, rounded up)."""
    batch, vocab = x.shape
    slices = -(-vocab // width)
    if slices * width != vocab:
        x = torch.nn.functional.pad(x, (0, slices * width - vocab), value=fill)
    return x.view(batch, slices, width)


def sample_tokens(
    logits: torch.Tensor,
    row_keys: torch.Tensor,
    step: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Next tokens `[batch]` long from logits `[batch, vocab]`: argmax when temperature <= 0,
    else an exact draw from the warped softmax p (`warp_logits`; bfloat16 / float16 logits are
    top-p's sort keys) by an exponential race,
    argmax_i p_i / E_i with E_i = -log(u_i), u = `counter_uniform(row_keys, step, vocab)`.

    row_keys: int64 `[batch]`; step: int64 `[1]` or `[batch]` device tensor. Pure tensor ops,
    fixed shapes: safe under torch.compile (one graph break, at top-p's cumulative sum) and CUDA graph capture.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
    sort_keys = logits if logits.dtype in SORT_KEY_DTYPES else None
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no cut), got {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
    probs = warp_logits(logits, temperature, top_k, top_p, sort_keys).softmax(dim=-1)
    race = counter_uniform(row_keys, step, logits.shape[-1]).log_().neg_()  # E = -log(u) ~ Exp(1), finite, > 0
    return first_argmax(probs.div_(race))


ARGMAX_SLICES = 128  # `first_argmax`'s slices per row


def first_argmax(scores: torch.Tensor, slices: int | None = None) -> torch.Tensor:
    """`scores.argmax(dim=-1)` for `[batch, vocab]` (the first index of each row's largest value),
    taken in two stages: the largest of each of `slices` (default ARGMAX_SLICES) equal runs of the
    row (padded with -inf), then the first slice holding the row's largest. Same index as argmax.

    Compiled, a one-stage argmax over 151,936 tokens is one program per row, and the noise the
    race divides by is hashed inside it: at batch size 1 one streaming multiprocessor hashed the
    whole row and took its argmax (91.7 µs per token on an H200, stop 20's profile). In slices that
    work spreads over batch * slices programs.
    """
    vocab = scores.shape[1]
    width = -(-vocab // max(1, min(slices or ARGMAX_SLICES, vocab)))
    best, where = _in_slices(scores, width, -float("inf")).max(dim=-1)  # [batch, slices]: first largest in each
    top = best.argmax(dim=-1, keepdim=True)  # [batch, 1]: the first slice with the row's largest
    return (top * width + where.gather(1, top))[:, 0]


_COMPILED: list = []


def compiled_sampler():
    """`sample_tokens` through torch.compile, made on first use: the noise, the race and the warpers'
    elementwise work become a few fused kernels (eagerly, ~15 full-vocabulary int64 and float passes
    per step); the cumulative sum of top-p stays eager (`_cumulative_sum`)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(sample_tokens, dynamic=False))
    return _COMPILED[0]


def row_keys_of(generators: list[torch.Generator]) -> torch.Tensor:
    """Each row's key, int64 `[batch]` on the generators' device: its generator's `initial_seed()`
    (as the int64 with the same 64 bits), so a problem's draws never depend on its batch."""
    if not generators:
        raise ValueError("row_keys_of needs one generator per row, got none")
    keys = [_signed(g.initial_seed()) for g in generators]
    return torch.tensor(keys, dtype=torch.int64, device=generators[0].device)


class Sampler:
    """Picks next tokens from logits `[batch, vocab]` -> `[batch]` with `sample_tokens`, one row key
    per problem generator.

    `sampler(logits)` uses and then advances (in place, on the device) an internal step counter
    `step` (int64 `[1]`); `sampler.sample(logits, step)` takes a counter the caller owns (e.g. one
    a captured graph reads). The generators must be on the logits' device.
    """

    def __init__(self, sampling: Sampling, generators: list[torch.Generator]):
        self.temperature = float(sampling.temperature)
        self.top_k = int(sampling.top_k)
        self.top_p = float(sampling.top_p)
        self.greedy = self.temperature <= 0
        self.keys = row_keys_of(generators)
        self.step = torch.zeros(1, dtype=torch.int64, device=self.keys.device)

    @property
    def settings(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p): what a step that samples inside its graph bakes in."""
        return self.temperature, self.top_k, self.top_p

    def sample(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Tokens `[batch]` for logits `[batch, vocab]` at `step` (int64 `[1]` or `[batch]`)."""
        return sample_tokens(logits, self.keys, step, *self.settings)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        token = self.sample(logits, self.step)
        self.step += 1
        return token
