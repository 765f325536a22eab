"""Products of three two-digit numbers, ``a * b * c``: too big for a small model to do in its head,
two `multiply` calls with the tool (a * b, then that times c).

A task is identified by ``task_id = "<kind>/<number>"``; `problem(task_id)` rebuilds its numbers,
question, answer and the reference solution from the id alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference_envs.datasets import distinct_tasks, task_rng

KINDS = ("product3",)
INSTRUCTION = "Use the tool."


@dataclass(frozen=True)
class Problem:
    task_id: str
    kind: str
    numbers: tuple[int, int, int]
    question: str
    answer: int

    def steps(self) -> list[tuple[str, int, int]]:
        """The reference solution: (tool, a, b) for each step, in order."""
        a, b, c = self.numbers
        return [("multiply", a, b), ("multiply", a * b, c)]


def problem(task_id: str) -> Problem:
    """Rebuild a task from its id; ValueError for an id this env never made."""
    kind, rng = task_rng("calculator", task_id, KINDS)
    a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(12, 99)
    return Problem(task_id=task_id, kind=kind, numbers=(a, b, c), question=f"What is {a} * {b} * {c}?",
                   answer=a * b * c)


def row(p: Problem, split: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"{p.question} {INSTRUCTION}"}],
        "ground_truth": p.answer,
        "metadata": {"env": "calculator", "task_id": p.task_id, "kind": p.kind, "split": split},
    }


def generate(*, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    """`n` distinct tasks of `split`."""
    problems = distinct_tasks("calculator", problem, lambda p: p.question, kinds=KINDS, split=split, seed=seed,
                              n=n, kind=kind)
    return [row(p, split) for p in problems]


def solution(task_row: dict[str, Any]) -> list[str | tuple[str, dict[str, Any]]]:
    """The env's own solver: the two tool calls (name, arguments) of a correct episode, then the answer."""
    p = problem(str(task_row["metadata"]["task_id"]))
    return [*((op, {"a": a, "b": b}) for op, a, b in p.steps()), f"The answer is {p.answer}."]
