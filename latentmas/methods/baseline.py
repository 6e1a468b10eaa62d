"""`baseline`: one agent, chain of thought."""

from __future__ import annotations

import time

from ..prompts import baseline_prompt
from .common import finish, generators_for, write_turn


def solve(lm, problems, task, cfg, observer=None):
    started = time.perf_counter()
    prompts = [baseline_prompt(p.question, task.answer_instruction) for p in problems]
    turns = write_turn(lm, "solver", prompts, cfg, generators_for(problems, cfg, lm.device))
    return finish(problems, task, [[t] for t in turns], started)
