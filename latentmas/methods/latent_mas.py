"""`latent_mas`: agents hand their work on through one shared KV cache.

Each non-judger agent prefills its prompt on the shared cache and then takes
`latent_steps` steps, feeding its last hidden state (through `LatentInput`)
back in as the next input embedding. Before each hand-off the cache may be kNN
filtered; observers (capture) see the cache the next agent is about to read.
The judger prefills its prompt on that cache and decodes the answer, so even
with `latent_steps 0` it still reads every earlier agent's prompt.

Observers hear of each hand-off twice: `on_handoff(event)` when the cache is
handed over (before the incoming agent reads it), and, if they define it,
`watch_prefill(event)`, a context manager wrapped around the incoming agent's
prompt prefill (for the judger, the prefill before decoding), so hooks can read
that forward pass. After each agent's latent steps an observer with `on_latent_steps` gets the
hidden states those steps fed back (`LatentStepsEvent`). The contract is `latentmas.handoff`.
"""

from __future__ import annotations

import time

import torch

from ..fast_decode import static_step, use_fast
from ..handoff import HandoffEvent, HandoffObserver, LatentStepsEvent, latent_steps_hook, watch_prefill
from ..knn import KnnFilter
from ..prefill import score_prompt
from ..prompts import AGENTS, agent_prompt
from ..realign import LatentInput
from ..shared_cache import LATENT, SegmentKey, SharedCache
from ..similarity import get_mode
from .common import AgentTurn, decode_turn, encode, finish, generators_for, thinking_of

SHARES_CACHE = True  # agents read one KV cache: the method capture watches


def mean_embedding(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, n, hidden], [batch, n] -> [batch, hidden] mean over real tokens (fp32)."""
    weights = mask.to(torch.float32)[..., None]
    return (embeds.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


_LATENT_INPUT: list = [None, None, None]  # model, realign, LatentInput of the last call


def latent_input_for(lm, realign: bool) -> LatentInput:
    """The realignment is solved once per model and reused across batches."""
    model, cached_realign, latent_input = _LATENT_INPUT
    if model is not lm.model or cached_realign != realign:
        latent_input = LatentInput(lm, realign)
        _LATENT_INPUT[:] = [lm.model, realign, latent_input]
    return latent_input


def knn_filter_of(cfg) -> KnnFilter | None:
    settings = cfg.knn_settings()
    return KnnFilter(**settings, score=cfg.knn_score) if settings else None


def knn_scores(lm, shared: SharedCache, knn: KnnFilter, query, prompt_embeds, ids, mask, agent: str):
    """The middle layer's `knn.score` similarities of the cache's columns for `agent`'s prompt: `[batch, T]`.

    A hand-off mode ("seed") needs only the mean prompt embedding `query` [batch, hidden]. A prefill
    mode ("query", "attention") runs a scoring pass (`latentmas.prefill.score_prompt`): the prompt
    (`prompt_embeds` [batch, n, hidden]) is prefilled on the untrimmed cache through the middle layer,
    then the cache is restored. That costs about half a prompt prefill per hand-off on top of the real
    one. "random" ignores scores.
    """
    middle = lm.num_layers // 2
    if not knn.needs_scores:
        return torch.zeros(shared.mask.shape, dtype=torch.float32, device=shared.mask.device)
    mode = get_mode(knn.score)
    if not mode.needs_prefill:
        return mode.score([shared.layer_keys()[middle]], query)[:, 0, :]
    return score_prompt(shared, prompt_embeds, mask, ids, SegmentKey(agent, "prompt"), mode, middle)


@torch.no_grad()
def think_latently(shared: SharedCache, latent_input: LatentInput, hidden: torch.Tensor, agent: str, steps: int,
                   fast: bool = False, keep_states: bool = False, compiled: bool = False):
    """`steps` latent steps from `hidden` [batch, hidden]; each appends one cache column.

    fast: step on a static KV buffer (a CUDA graph on GPUs), then hand the columns back;
    compiled: compile that step (`--compile_step`).
    keep_states: return `(hidden_states, realigned)`: the hidden states `[batch, steps, hidden]` that
    became the steps' inputs (before realignment) and, with realignment, the inputs fed
    `[batch, steps, hidden]` (else None), written into preallocated device tensors (no host sync).
    Otherwise returns None.
    """
    segment = SegmentKey(agent, "latent")
    states = realigned = None
    if keep_states:
        states = hidden.new_empty(shared.batch_size, steps, hidden.shape[-1])
        if latent_input.matrix is not None:
            realigned = torch.empty(shared.batch_size, steps, hidden.shape[-1], dtype=latent_input.dtype,
                                    device=hidden.device)

    def next_input(i: int, hidden: torch.Tensor) -> torch.Tensor:
        fed = latent_input(hidden)
        if states is not None:
            states[:, i].copy_(hidden)
            if realigned is not None:
                realigned[:, i].copy_(fed)
        return fed

    if fast and steps > 0:
        step = static_step(shared.lm, shared, steps, tokens=False, compiled=compiled)
        for i in range(steps):
            hidden = step.run(next_input(i, hidden))
        shared.adopt(step.kv, steps, LATENT, segment)
    else:
        ones = torch.ones(shared.batch_size, 1, dtype=torch.bool, device=hidden.device)
        latent_ids = torch.full((shared.batch_size, 1), LATENT, dtype=torch.long, device=hidden.device)
        for i in range(steps):
            hidden = shared.extend(next_input(i, hidden)[:, None, :], ones, latent_ids, segment)
    return None if states is None else (states, realigned)


def solve(lm, problems, task, cfg, observer: HandoffObserver | None = None):
    started = time.perf_counter()
    latent_input = latent_input_for(lm, cfg.latent_space_realign)
    knn = knn_filter_of(cfg)
    knn_generators = generators_for(problems, cfg, lm.device, salt=7919)
    embed = lm.model.get_input_embeddings()
    fast = use_fast(lm.device, cfg.fast_decode)
    encoded = [encode(lm, [agent_prompt(agent, p.question, task.answer_instruction, cfg.prompt, "latent_mas")
                           for p in problems], thinking_of(cfg)) for agent in AGENTS]
    columns = sum(ids.shape[1] for _, ids, _ in encoded) + (len(AGENTS) - 1) * cfg.latent_steps + cfg.max_new_tokens
    shared = SharedCache(lm, len(problems), capacity=columns, compiled=cfg.compile_prefill,
                         graphed=fast and cfg.graph_prefill, packed=cfg.packed_prefill)
    previous = None
    for index, (agent, (texts, ids, mask)) in enumerate(zip(AGENTS, encoded)):
        prompt_embeds = embed(ids)
        event = None
        if previous is not None:
            query = mean_embedding(prompt_embeds, mask)
            if knn is not None:
                scores = knn_scores(lm, shared, knn, query, prompt_embeds, ids, mask, agent)
                keep = knn.keep_mask(scores, shared.mask, knn_generators)
                shared.keep(keep, renumber=cfg.knn_positions == "renumber")
            if observer is not None:
                event = HandoffEvent(previous, agent, shared, query, ids, mask, problems)
                observer.on_handoff(event)
        prefill = watch_prefill(observer, event)
        if agent == AGENTS[-1]:
            generators = generators_for(problems, cfg, lm.device, salt=index)
            judged = decode_turn(lm, shared, agent, texts, ids, mask, cfg, generators, prefill=prefill,
                                 while_decoding=getattr(observer, "while_decoding", None),
                                 prompt_embeds=prompt_embeds)
        else:
            with prefill:
                hidden = shared.extend(prompt_embeds, mask, ids, SegmentKey(agent, "prompt"))
            hook = latent_steps_hook(observer) if cfg.latent_steps > 0 else None
            kept = think_latently(shared, latent_input, hidden, agent, cfg.latent_steps, fast,
                                  keep_states=hook is not None, compiled=cfg.compile_step)
            if hook is not None:
                hook(LatentStepsEvent(agent, shared, *kept, problems))
        previous = agent
    return finish(problems, task, [list(turns) for turns in zip(*thinking_turns(encoded[:-1], cfg), judged)], started)


def thinking_turns(encoded: list, cfg) -> list[list[AgentTurn]]:
    """Each thinking agent's turns (one per problem) from its encoded prompts (texts, ids, mask [batch, n]).

    Called after the judger has decoded, because counting the prompts' tokens reads the device. Read
    between hand-offs, the counts left the device idle while the host queued the next hand-off's work.
    """
    counts = torch.stack([mask.sum(dim=1) for _, _, mask in encoded]).tolist()  # [agents][batch], one read
    return [[AgentTurn(agent, text, "", tokens, 0, cfg.latent_steps) for text, tokens in zip(texts, row)]
            for agent, (texts, _, _), row in zip(AGENTS, encoded, counts)]
