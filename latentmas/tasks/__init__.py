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

from . import numeric  # noqa: F401, I001  (importing registers the tasks, in this order)
from . import choice  # noqa: F401
from .base import HubSpec, Problem, Task, TaskDataError, get_task, register, task_names
from .loading import load_problems

TASK_NAMES = task_names()  # the built-in tasks; a task is one `register(Task(...))` in a family module


__all__ = ["Problem", "Task", "HubSpec", "get_task", "TASK_NAMES", "task_names", "register", "load_problems",
           "TaskDataError"]
