"""`latent_mas`: agents hand their work on through one shared KV cache.

Each non-judger agent prefills its prompt on the shared cache and then takes
`latent_steps` steps, feeding its last hidden state (through `LatentInput`)
back in as the next input embedding. Before each hand-off the cache may be kNN
filtered; observers (capture) see the cache the next agent is about to read.
The judger prefills its prompt on that cache and decodes the answer, so even
with `latent_steps 0` it still reads every earlier agent's prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from capture.similarity import layer_similarities

from ..knn import KnnFilter
from ..prompts import AGENTS, agent_prompt
from ..realign import LatentInput
from ..shared_cache import LATENT, SegmentKey, SharedCache
from .common import AgentTurn, decode_turn, encode, finish, generators_for


@dataclass
class HandoffEvent:
    """The moment `to_agent` takes over the shared cache from `from_agent`.

    query: [batch, hidden], mean input embedding of `to_agent`'s prompt (real tokens only).
    prompt_ids / prompt_mask: [batch, n], `to_agent`'s left-padded prompt.
    """

    from_agent: str
    to_agent: str
    shared: SharedCache
    query: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    problems: list


class HandoffObserver(Protocol):
    def on_handoff(self, event: HandoffEvent) -> None: ...


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
    return KnnFilter(**settings) if settings else None


@torch.no_grad()
def think_latently(shared: SharedCache, latent_input: LatentInput, hidden: torch.Tensor, agent: str, steps: int):
    """`steps` latent steps from `hidden` [batch, hidden]; each appends one cache column."""
    ones = torch.ones(shared.batch_size, 1, dtype=torch.bool, device=hidden.device)
    latent_ids = torch.full((shared.batch_size, 1), LATENT, dtype=torch.long, device=hidden.device)
    for _ in range(steps):
        hidden = shared.extend(latent_input(hidden)[:, None, :], ones, latent_ids, SegmentKey(agent, "latent"))
    return hidden


def solve(lm, problems, task, cfg, observer: HandoffObserver | None = None):
    started = time.perf_counter()
    latent_input = latent_input_for(lm, cfg.latent_space_realign)
    knn = knn_filter_of(cfg)
    knn_generators = generators_for(problems, cfg, lm.device, salt=7919)
    embed = lm.model.get_input_embeddings()
    shared = SharedCache(lm, len(problems))
    turns: list[list[AgentTurn]] = [[] for _ in problems]
    previous = None
    for index, agent in enumerate(AGENTS):
        prompts = [agent_prompt(agent, p.question, task.answer_instruction, cfg.prompt, "latent_mas")
                   for p in problems]
        texts, ids, mask = encode(lm, prompts, cfg.think)
        if previous is not None:
            query = mean_embedding(embed(ids), mask)
            if knn is not None:
                middle = lm.num_layers // 2
                scores = layer_similarities([shared.layer_keys()[middle]], query)[:, 0, :]
                shared.keep(knn.keep_mask(scores, shared.mask, knn_generators))
            if observer is not None:
                observer.on_handoff(HandoffEvent(previous, agent, shared, query, ids, mask, problems))
        if agent == AGENTS[-1]:
            generators = generators_for(problems, cfg, lm.device, salt=index)
            new = decode_turn(lm, shared, agent, texts, ids, mask, cfg, generators)
        else:
            hidden = shared.extend(embed(ids), mask, ids, SegmentKey(agent, "prompt"))
            think_latently(shared, latent_input, hidden, agent, cfg.latent_steps)
            new = [AgentTurn(agent, text, "", int(m.sum()), 0, cfg.latent_steps) for text, m in zip(texts, mask)]
        for done, turn in zip(turns, new):
            done.append(turn)
        previous = agent
    return finish(problems, task, turns, started)
