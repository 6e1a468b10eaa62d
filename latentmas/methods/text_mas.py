"""`text_mas`: the four agents pass their work on as text."""

from __future__ import annotations

import time

from ..prompts import AGENTS, agent_prompt
from ..shared_cache import SharedCache
from .common import finish, generators_for, write_turn


def _tail(lm, text: str, max_tokens: int) -> str:
    """The last `max_tokens` tokens of `text` (what fits the hand-over budget)."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else lm.tokenizer.decode(ids[-max_tokens:])


def solve(lm, problems, task, cfg, observer=None):
    started = time.perf_counter()
    turns = [[] for _ in problems]
    for index, agent in enumerate(AGENTS):
        prompts = []
        for problem, done in zip(problems, turns):
            previous = [(t.agent, _tail(lm, t.output, cfg.text_mas_context_length)) for t in done]
            prompts.append(agent_prompt(agent, problem.question, task.answer_instruction, cfg.prompt,
                                        "text_mas", previous))
        shared = SharedCache(lm, len(problems))  # each agent reads text, not a cache
        new = write_turn(lm, shared, agent, prompts, cfg, generators_for(problems, cfg, lm.device, salt=index))
        for done, turn in zip(turns, new):
            done.append(turn)
    return finish(problems, task, turns, started)
