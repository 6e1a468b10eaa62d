"""`text_mas`: the four agents pass their work on as text.

sequential: each agent reads every earlier agent's text. hierarchical: the three specialists
answer independently and only the judger reads all three (as in the original LatentMAS).
"""

from __future__ import annotations

import time

from ..prompts import AGENTS, agent_prompt
from .common import finish, generators_for, write_turn


def _tail(lm, text: str, max_tokens: int) -> str:
    """The last `max_tokens` tokens of `text` (what fits the hand-over budget)."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else lm.tokenizer.decode(ids[-max_tokens:])


def readable_turns(agent: str, topology: str, done: list) -> list:
    """The earlier turns `agent` reads. sequential: all of them, in order; hierarchical: none for the
    specialists (they answer independently), all of them for the judger, as in the original."""
    if topology == "hierarchical" and agent != AGENTS[-1]:
        return []
    return done


def solve(lm, problems, task, cfg, observer=None):
    started = time.perf_counter()
    turns = [[] for _ in problems]
    for index, agent in enumerate(AGENTS):
        prompts = []
        for problem, done in zip(problems, turns):
            previous = [(t.agent, _tail(lm, t.output, cfg.text_mas_context_length))
                        for t in readable_turns(agent, cfg.prompt, done)]
            prompts.append(agent_prompt(agent, problem.question, task.answer_instruction, cfg.prompt,
                                        "text_mas", previous))
        new = write_turn(lm, agent, prompts, cfg, generators_for(problems, cfg, lm.device, salt=index))
        for done, turn in zip(turns, new):
            done.append(turn)
    return finish(problems, task, turns, started)
