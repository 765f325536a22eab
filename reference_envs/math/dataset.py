"""Math tasks: two-digit sums, small arithmetic expressions, short word problems.

A task is identified by ``task_id = "<kind>/<number>"``; `problem(task_id)` rebuilds its
question and answer from that id alone, which is how the env server scores a rollout without
ever seeing the row's ground_truth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from reference_envs.datasets import distinct_tasks, task_rng

KINDS = ("sums", "arithmetic", "word")
#: What each row asks for, after the question (short: the demo trains a 135M model on it).
INSTRUCTION = "Answer with a number only."


@dataclass(frozen=True)
class Problem:
    task_id: str
    kind: str
    question: str
    answer: int


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
_THINGS = ["apples", "books", "marbles", "stamps", "pencils", "cards", "shells", "coins"]


def _sums(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", a + b


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(1, 50)
    form = rng.randrange(4)
    if form == 0:
        return f"What is {a} * {b} + {c}?", a * b + c
    if form == 1:
        return f"What is {a} * {b} - {c}?", a * b - c
    if form == 2:
        return f"What is ({a} + {c}) * {b}?", (a + c) * b
    return f"What is {a + c} - {c} + {b}?", a + b


def _word(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b, k = rng.randint(5, 60), rng.randint(2, 30), rng.randint(2, 9)
    form = rng.randrange(4)
    if form == 0:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if form == 1:
        a = a + b
        return f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?", a - b
    if form == 2:
        return f"{name} buys {k} boxes with {b} {thing} in each box. How many {thing} is that in total?", k * b
    total = k * b
    return f"{name} shares {total} {thing} equally among {k} friends. How many {thing} does each friend get?", b


_MAKERS = {"sums": _sums, "arithmetic": _arithmetic, "word": _word}


def problem(task_id: str) -> Problem:
    """Rebuild a task from its id (``"sums/1234"``); ValueError for an id this env never made."""
    kind, rng = task_rng("math", task_id, KINDS)
    question, answer = _MAKERS[kind](rng)
    return Problem(task_id=task_id, kind=kind, question=question, answer=answer)


def row(p: Problem, split: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"{p.question} {INSTRUCTION}"}],
        "ground_truth": p.answer,
        "metadata": {"env": "math", "task_id": p.task_id, "kind": p.kind, "split": split},
    }


def generate(*, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    """`n` distinct tasks of `split` (all kinds mixed unless `kind` is given)."""
    problems = distinct_tasks("math", problem, lambda p: p.question, kinds=KINDS, split=split, seed=seed, n=n,
                              kind=kind)
    return [row(p, split) for p in problems]


def solution(task_row: dict[str, Any]) -> list[str | tuple[str, dict[str, Any]]]:
    """The env's own solver: the answer, as the one reply of a correct episode."""
    return [str(problem(str(task_row["metadata"]["task_id"])).answer)]
