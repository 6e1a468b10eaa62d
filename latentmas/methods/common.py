"""What every method shares: prompt encoding, agent turns, results."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ..decoding import Sampling, generate, problem_generators
from ..prompts import Prompt
from ..shared_cache import SharedCache


@dataclass
class AgentTurn:
    """One agent's part in a problem: the prompt it read and the text it wrote ('' in latent mode)."""

    agent: str
    input: str
    output: str
    input_tokens: int
    output_tokens: int
    latent_steps: int = 0


@dataclass
class ProblemResult:
    number: int
    question: str
    gold: str
    prediction: str | None
    correct: bool
    output: str
    agents: list[AgentTurn] = field(default_factory=list)
    generated_tokens: int = 0
    time_sec: float = 0.0


def encode(lm, prompts: list[Prompt], think: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Chat-format and tokenize a batch of prompts, left-padded.

    Returns (texts, ids [batch, n], mask [batch, n] bool) on the model's device.
    """
    texts = [
        lm.tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=think)
        for p in prompts
    ]
    batch = lm.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return texts, batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device).bool()


def sampling_of(cfg) -> Sampling:
    return Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.ignore_eos, cfg.fast_decode)


def write_turn(lm, shared: SharedCache, agent: str, prompts: list[Prompt], cfg, generators) -> list[AgentTurn]:
    """An agent that writes text: prefill its prompt on `shared` and decode."""
    return decode_turn(lm, shared, agent, *encode(lm, prompts, cfg.think), cfg, generators)


def decode_turn(lm, shared: SharedCache, agent: str, texts, ids, mask, cfg, generators,
                prefill: AbstractContextManager | None = None, while_decoding=None,
                prompt_embeds=None) -> list[AgentTurn]:
    """`write_turn` for a prompt already encoded (texts, ids [batch, n], mask [batch, n]).

    prefill, while_decoding, prompt_embeds: optional, see `generate`.
    """
    outputs = generate(shared, ids, mask, agent, sampling_of(cfg), generators, prefill=prefill,
                       while_decoding=while_decoding, prompt_embeds=prompt_embeds)
    decoded = lm.tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return [
        AgentTurn(agent, text, out, int(m.sum()), len(o))
        for text, out, m, o in zip(texts, decoded, mask, outputs)
    ]


def finish(problems, task, turns_per_problem: list[list[AgentTurn]], started: float) -> list[ProblemResult]:
    """Score each problem on its last agent's text."""
    elapsed = (time.perf_counter() - started) / max(len(problems), 1)
    results = []
    for problem, turns in zip(problems, turns_per_problem):
        output = turns[-1].output
        prediction = task.extract_answer(output)
        results.append(ProblemResult(
            number=problem.number, question=problem.question, gold=problem.gold, prediction=prediction,
            correct=task.is_correct(prediction, problem.gold), output=output, agents=turns,
            generated_tokens=sum(t.output_tokens for t in turns), time_sec=elapsed,
        ))
    return results


def generators_for(problems, cfg, device, salt: int = 0):
    return problem_generators([p.number for p in problems], cfg.seed + salt, device)
