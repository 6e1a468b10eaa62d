"""What every method shares: prompt encoding, agent turns, results."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ..decoding import Sampling, generate, problem_generators
from ..fast_decode import use_fast
from ..prompts import Prompt
from ..shared_cache import SharedCache
from ..tasks.scoring import original_correct, original_prediction


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
    # the original LatentMAS's rule on the same output (`latentmas.tasks.scoring`)
    prediction_original: str | None = None
    correct_original: bool = False


THINKING = ("template", "open", "off")


def thinking_of(cfg) -> str:
    """How agents' prompts end, from `think` / `no_think`:

    "template" (default, as the original): the chat template's own generation prompt; Qwen3's
    thinking is on and the model opens `<think>` itself. "open" (`--think`, the original's
    `--think`): a bare `<think>` is appended. "off" (`--no_think`): the template writes an empty
    `<think></think>` block (`enable_thinking=False`), which turns Qwen3's thinking off.
    """
    if cfg.think and cfg.no_think:
        raise ValueError("--think and --no_think contradict each other; pass at most one")
    return "open" if cfg.think else "off" if cfg.no_think else "template"


def chat_text(lm, prompt: Prompt, thinking: str) -> str:
    """One prompt as chat text, ending as `thinking` ("template", "open" or "off") says."""
    if thinking not in THINKING:
        raise ValueError(f"unknown thinking mode {thinking!r}; choose {', '.join(THINKING)}")
    options = {"enable_thinking": False} if thinking == "off" else {}
    text = lm.tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True,
                                            **options)
    return text + "<think>" if thinking == "open" else text


def encode(lm, prompts: list[Prompt], think: str | bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Chat-format and tokenize a batch of prompts, left-padded.

    think: "template", "open" or "off" (see `thinking_of`), or a bool read as the `--think`
    flag (False = "template", True = "open").
    Returns (texts, ids [batch, n], mask [batch, n] bool) on the model's device.
    """
    thinking = ("open" if think else "template") if isinstance(think, bool) else think
    texts = [chat_text(lm, p, thinking) for p in prompts]
    batch = lm.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return texts, batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device).bool()


def top_k_of(lm, cfg) -> int:
    """The top-k cut to sample with: `cfg.top_k`, or for -1 the model's generation config (0 = none)."""
    if cfg.top_k >= 0:
        return cfg.top_k
    generation_config = getattr(lm.model, "generation_config", None)
    return int(getattr(generation_config, "top_k", None) or 0)


def sampling_of(cfg, lm=None) -> Sampling:
    """Decoding settings; lm resolves `top_k -1` (without it, -1 means no top-k cut)."""
    top_k = top_k_of(lm, cfg) if lm is not None else max(cfg.top_k, 0)
    return Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.ignore_eos, cfg.fast_decode, top_k,
                    cfg.compile_step)


def write_turn(lm, agent: str, prompts: list[Prompt], cfg, generators) -> list[AgentTurn]:
    """An agent that writes text: prefill its prompt on a cache of its own and decode."""
    texts, ids, mask = encode(lm, prompts, thinking_of(cfg))
    shared = SharedCache(lm, len(prompts), capacity=ids.shape[1] + cfg.max_new_tokens,
                         compiled=cfg.compile_prefill, packed=cfg.packed_prefill,
                         graphed=use_fast(lm.device, cfg.fast_decode) and cfg.graph_prefill)
    return decode_turn(lm, shared, agent, texts, ids, mask, cfg, generators)


def decode_turn(lm, shared: SharedCache, agent: str, texts, ids, mask, cfg, generators,
                prefill: AbstractContextManager | None = None, while_decoding=None,
                prompt_embeds=None) -> list[AgentTurn]:
    """`write_turn` for a prompt already encoded (texts, ids [batch, n], mask [batch, n]).

    prefill, while_decoding, prompt_embeds: optional, see `generate`.
    """
    outputs = generate(shared, ids, mask, agent, sampling_of(cfg, lm), generators, prefill=prefill,
                       while_decoding=while_decoding, prompt_embeds=prompt_embeds)
    decoded = lm.tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return [
        AgentTurn(agent, text, out, int(m.sum()), len(o))
        for text, out, m, o in zip(texts, decoded, mask, outputs)
    ]


def finish(problems, task, turns_per_problem: list[list[AgentTurn]], started: float) -> list[ProblemResult]:
    """Score each problem on its last agent's text, by this project's rule and by the original's."""
    elapsed = (time.perf_counter() - started) / max(len(problems), 1)
    results = []
    for problem, turns in zip(problems, turns_per_problem):
        output = turns[-1].output
        prediction = task.extract_answer(output)
        original = original_prediction(output)
        results.append(ProblemResult(
            number=problem.number, question=problem.question, gold=problem.gold, prediction=prediction,
            correct=task.is_correct(prediction, problem.gold), output=output, agents=turns,
            generated_tokens=sum(t.output_tokens for t in turns), time_sec=elapsed,
            prediction_original=original, correct_original=original_correct(task.name, original, problem.gold),
        ))
    return results


def generators_for(problems, cfg, device, salt: int = 0):
    return problem_generators([p.number for p in problems], cfg.seed + salt, device)
