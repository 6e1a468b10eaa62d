"""Decoding text on a shared cache: temperature / top-k / top-p sampling (`sampling.Sampler`), keyed per problem."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fast_decode import static_step, use_fast
from .sampling import Sampler
from .shared_cache import SegmentKey, SharedCache

# Decoding checks for end of turn (a host sync) every CHECK_EVERY tokens. `while_decoding` runs
# after OVERLAP_AFTER steps are queued, just before the second check, so that steps 8..14
# (~60 ms of a 4B model's decoding) are still queued.
CHECK_EVERY = 8
OVERLAP_AFTER = 2 * CHECK_EVERY - 2
# On CUDA a piece of that work runs only while the device has more than LEAD decoding steps queued, so
# that no piece leaves it idle (a capture's piece took up to 28 ms on a 2-core CPU; a step at batch size
# 64 takes ~8 ms on an H200).
LEAD = 4


@dataclass
class Sampling:
    """temperature <= 0 means greedy. ignore_eos decodes exactly max_new_tokens (benchmarks).
    top_k > 0 keeps the k most likely tokens before top-p, as transformers' `generate` does.

    fast: decode with a static KV buffer (`fast_decode.StaticStep`, a CUDA graph on
    GPUs); None = on for CUDA, off on the CPU. compiled: compile that step (`--compile_step`).
    """

    max_new_tokens: int = 2048
    temperature: float = 0.6
    top_p: float = 0.95
    ignore_eos: bool = False
    fast: bool | None = None
    top_k: int = 0  # 0 = no top-k cut
    compiled: bool = False


def problem_generators(numbers: list[int], seed: int, device: torch.device) -> list[torch.Generator]:
    """One RNG per problem, seeded by (seed, problem number), so batching never changes a draw."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + n) for n in numbers]


def eos_ids(lm) -> set[int]:
    """Every id that ends a turn for this model (tokenizer eos, config eos, `<|im_end|>`)."""
    ids = set()
    for value in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != lm.tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


@torch.no_grad()
def generate(
    shared: SharedCache,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    agent: str,
    sampling: Sampling,
    generators: list[torch.Generator],
    prefill: contextlib.AbstractContextManager | None = None,
    while_decoding: Callable[[], None] | None = None,
    prompt_embeds: torch.Tensor | None = None,
) -> list[list[int]]:
    """Prefill a left-padded prompt `[batch, n]` on `shared`, then decode.

    prefill: a context manager entered around the prompt's prefill only (e.g. an observer's
    `watch_prefill`, whose hooks read that forward pass), never around the decoding.
    while_decoding: host work (e.g. writing a capture) called once, after OVERLAP_AFTER
    steps have been queued, so that it runs while the device decodes; or at the end. If it
    returns an iterator, that is the work in pieces, taken between the steps queued from then on
    (`_Pacer`: on CUDA while the device is more than LEAD steps behind, on the CPU one per step),
    the rest after the last step.
    prompt_embeds: the prompt's input embeddings `[batch, n, hidden]`, when the caller has them.

    Returns each row's generated ids, cut after its first end-of-turn token. With
    `sampling.fast` the decoded tokens' keys and values are written into `shared`'s storage after its
    columns without being counted in (`shared.length` stays the prompt's end).
    """
    lm = shared.lm
    embed = lm.model.get_input_embeddings()
    sampler = Sampler(sampling, generators)
    stop = torch.tensor(sorted(eos_ids(lm)), device=lm.device)
    with prefill if prefill is not None else contextlib.nullcontext():
        if prompt_embeds is None:
            prompt_embeds = embed(prompt_ids)
        logits = shared.extend(prompt_embeds, prompt_mask, prompt_ids, SegmentKey(agent, "prompt"), logits=True)
    token = sampler(logits) if sampling.max_new_tokens > 0 else None
    step_fn = None
    if use_fast(lm.device, sampling.fast) and sampling.max_new_tokens > 1:
        step_fn = static_step(lm, shared, sampling.max_new_tokens, compiled=sampling.compiled, sampler=sampler).run
    batch = prompt_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=lm.device)
    ones = torch.ones(batch, 1, dtype=torch.bool, device=lm.device)
    steps = []
    work = None  # the pieces of while_decoding's work still to do
    pacer = _Pacer(lm.device)
    for step in range(sampling.max_new_tokens):
        steps.append(token)
        if not sampling.ignore_eos:
            finished |= torch.isin(token, stop)
            if step % CHECK_EVERY == CHECK_EVERY - 1:
                work = pacer.before_waiting(work)  # the host is about to wait for the device anyway
                if bool(finished.all()):  # one host sync per check
                    break
        if step + 1 < sampling.max_new_tokens:
            if step_fn is not None:  # the step samples inside its graph: the same draw as below
                token = step_fn(token).clone()
            else:
                ids = token[:, None]
                token = sampler(shared.extend(embed(ids), ones, ids, SegmentKey(agent, "output"), logits=True))
            pacer.queued()
        if step == OVERLAP_AFTER and while_decoding is not None:
            work = while_decoding()
            while_decoding = None
        if work is not None:
            work = pacer.take(work)
    if while_decoding is not None:
        work = while_decoding()
    while work is not None:
        work = _next_piece(work)
    if not steps:
        return [[] for _ in range(batch)]
    generated = torch.stack(steps, dim=1).tolist()
    stops = set(stop.tolist()) if not sampling.ignore_eos else set()
    return [_cut_after_stop(row, stops) for row in generated]


class _Pacer:
    """When to take pieces of host work between queued decoding steps: on CUDA while the device has not
    finished the step queued LEAD steps before the last (a ring of CUDA events, one recorded after each
    step queued), so it still has more than LEAD steps to run; on the CPU one piece per step."""

    def __init__(self, device: torch.device):
        self.events = [torch.cuda.Event() for _ in range(LEAD + 1)] if device.type == "cuda" else None
        self.count = 0  # steps queued

    def queued(self) -> None:
        """Note a step just queued."""
        if self.events is not None:
            self.events[self.count % len(self.events)].record()
        self.count += 1

    def ahead(self, lead: int = LEAD) -> bool:
        """Whether the device is still more than `lead` (at most LEAD) steps behind the host."""
        return self.count > lead and not self.events[(self.count - 1 - lead) % len(self.events)].query()

    def take(self, work):
        """Pieces of `work` (`_next_piece`) for now: one on the CPU, as many as stay ahead on CUDA; the work
        left, or None once it is done (or was no iterator: done already)."""
        if self.events is None or not hasattr(work, "__next__"):
            return _next_piece(work)
        return self._while_ahead(work, LEAD)

    def before_waiting(self, work):
        """Pieces of `work` for as long as the device runs the steps queued, when the host is about to wait
        for it (the end-of-turn check): on CUDA only; the work left."""
        if self.events is None or not hasattr(work, "__next__"):
            return work
        return self._while_ahead(work, 0)

    def _while_ahead(self, work, lead: int):
        while work is not None and self.ahead(lead):
            work = _next_piece(work)
        return work


def _next_piece(work):
    """Do one piece of `work` (an iterator; anything else is done already); None once it is finished."""
    if work is None or not hasattr(work, "__next__"):
        return None
    try:
        next(work)
    except StopIteration:
        return None
    return work


def _cut_after_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids
