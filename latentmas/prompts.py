"""The agents' prompts, for each topology and method. Text only; no model code here.

Four agents work in turn: planner -> critic -> refiner -> judger. In `latent_mas`
the first three leave their work in the shared KV cache (no text), and the
judger writes the answer. In `text_mas` each agent writes text that the next
ones read. `baseline` is one agent alone.
"""

from __future__ import annotations

from dataclasses import dataclass

AGENTS = ("planner", "critic", "refiner", "judger")
TEAM = "You are one of four agents (Planner, Critic, Refiner, Judger) who solve a problem together."

# role instructions per topology: agent -> (system role, task)
_ROLES = {
    "sequential": {
        "planner": ("You are the Planner.",
                    "Lay out a step-by-step plan that would solve the question. Name the quantities and "
                    "operations you need; do not give a final answer yet."),
        "critic": ("You are the Critic.",
                   "Check the team's plan so far: find wrong steps, missing cases and arithmetic slips, and "
                   "say how to fix each one."),
        "refiner": ("You are the Refiner.",
                    "Combine the plan and the critique into a corrected, complete line of reasoning that "
                    "reaches the answer."),
        "judger": ("You are the Judger.",
                   "Use the team's reasoning, check it once more, and solve the question."),
    },
    "hierarchical": {
        "planner": ("You are the Mathematics Specialist.",
                    "Solve the question independently with careful calculation."),
        "critic": ("You are the Domain Specialist.",
                   "Solve the question independently, using the relevant facts of its field."),
        "refiner": ("You are the Verification Specialist.",
                    "Solve the question independently and check each result by another route."),
        "judger": ("You are the Judger, who reads the specialists' work.",
                   "Weigh the specialists' solutions, settle any disagreement, and solve the question."),
    },
}

_SHARED_MEMORY = {
    "latent_mas": "The other agents' thoughts are already in your working memory; build on them.",
    "text_mas": "The other agents' notes are quoted below; build on them.",
}


@dataclass(frozen=True)
class Prompt:
    """Chat messages for one agent on one problem."""

    agent: str
    messages: tuple[dict, ...]


def agent_prompt(
    agent: str,
    question: str,
    answer_instruction: str,
    topology: str = "sequential",
    method: str = "latent_mas",
    previous: list[tuple[str, str]] | None = None,
) -> Prompt:
    """Messages for `agent`.

    previous: text_mas only, the earlier agents' (name, text) in order.
    """
    if topology not in _ROLES:
        raise ValueError(f"unknown prompt topology {topology!r}; choose {', '.join(_ROLES)}")
    role, task = _ROLES[topology][agent]
    is_first = agent == AGENTS[0]
    system = f"{TEAM} {role}" + ("" if is_first else f" {_SHARED_MEMORY[method]}")
    parts = [f"Question:\n{question}"]
    if previous:
        notes = "\n\n".join(f"[{name.capitalize()}]\n{text.strip()}" for name, text in previous)
        parts.append(f"Notes from the team:\n{notes}")
    parts.append(task)
    if agent == "judger":
        parts.append(answer_instruction)
    return Prompt(agent, ({"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}))


def baseline_prompt(question: str, answer_instruction: str) -> Prompt:
    """A single agent reasoning step by step."""
    system = "You are a careful problem solver."
    user = f"Question:\n{question}\n\nThink step by step, then answer. {answer_instruction}"
    return Prompt("solver", ({"role": "system", "content": system}, {"role": "user", "content": user}))
