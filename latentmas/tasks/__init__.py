"""Benchmark tasks: loading problems, extracting answers from model output, scoring.

    from latentmas.tasks import get_task, load_problems
    task = get_task("gsm8k")
    for problem in load_problems(task, max_samples=5):
        prompt = f"{problem.question}\\n{task.answer_instruction}"
        ...
        task.is_correct(task.extract_answer(output), problem.gold)

Families: `numeric` (gsm8k, aime2024, aime2025) and `choice` (gpqa, medqa,
arc_easy, arc_challenge). No torch or transformers imports here.
"""

from . import choice, numeric  # noqa: F401  (importing registers the tasks)
from .base import TASK_NAMES, HubSpec, Problem, Task, TaskDataError, get_task
from .loading import load_problems


def task_names() -> tuple[str, ...]:
    return TASK_NAMES


__all__ = ["Problem", "Task", "HubSpec", "get_task", "TASK_NAMES", "load_problems", "TaskDataError"]
