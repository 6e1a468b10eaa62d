"""Which rank solves which problems: shares balanced by estimated work, not by count alone.

Every rank gets the same number of problems, give or take one (so, at any batch size, the same
number of batches, give or take one), and among such splits the estimated work is balanced
greedily: problems longest first, each to the least-loaded rank that still has room (ties: the
lower problem number first, the lower rank). Each share is solved in problem-number order,
so a rank's batches group problems of one stretch of the data set, its shard is in number
order (the merge reads it in a few row blocks, see `capture.format.CaptureReader.copied_rows`)
and the plan is deterministic: the same problems and world size give the same shares. With
`--batch_order length` a share is solved longest question first (`in_batch_order`): batches of
problems of similar length pad less, and the merge reads such a shard in more, smaller blocks.

A problem's result does not depend on its share: its random draws come from its own
generator, seeded by the run's seed and its number (`latentmas.decoding.problem_generators`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


def question_work(questions: Mapping[int, str]) -> dict[int, int]:
    """number -> estimated work of solving it: its question's length in characters.

    The agents' prompt templates, latent steps and decoded tokens add about the same to every
    problem; what differs is the question, read by every agent (tokens are about proportional to
    characters, and counting characters needs no tokenizer)."""
    return {number: len(question) for number, question in questions.items()}


def in_batch_order(problems: Sequence, order: str) -> list:
    """A share's problems (objects with .number and .question) in the order they are batched: "number"
    (as given), or "length": longest question first (`question_work`; ties by number), so that each
    batch holds problems of similar length and the left-padding of the agents' prompts is small, and
    the first batch, which sizes the shared cache's storage, is the largest."""
    if order == "number":
        return list(problems)
    if order != "length":
        raise ValueError(f"unknown batch order {order!r}; choose number or length")
    work = question_work({p.number: p.question for p in problems})
    return sorted(problems, key=lambda p: (-work[p.number], p.number))


def batches(problems: Sequence, size: int, order: str) -> list[list]:
    """A share's problems cut into the batches a run solves, `size` problems each (the last may hold
    fewer), in `order` (`in_batch_order`)."""
    ordered = in_batch_order(problems, order)
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def balanced_shares(work: Mapping[int, float], world_size: int) -> list[list[int]]:
    """The problem numbers of each rank (`world_size` lists, each in number order): a partition of `work`'s keys.

    work: number -> estimated work (`question_work`). Counts differ by at most one; within that,
    problems go longest first to the least-loaded rank that still has room.
    """
    if world_size < 1:
        raise ValueError(f"world size {world_size} is not >= 1")
    base, extra = divmod(len(work), world_size)  # `extra` ranks take base + 1 problems, the others base
    heap = [(0.0, rank) for rank in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for number in sorted(work, key=lambda n: (-work[n], n)):
        while True:  # a rank popped when full is dropped: it stays full
            load, rank = heapq.heappop(heap)
            if len(shares[rank]) < base + (1 if extra else 0):
                break
        shares[rank].append(number)
        extra -= len(shares[rank]) == base + 1
        heapq.heappush(heap, (load + work[number], rank))
    return [sorted(share) for share in shares]
