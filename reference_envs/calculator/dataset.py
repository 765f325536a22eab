"""Two-step arithmetic tasks over three-digit numbers: ``a OP1 b OP2 c`` evaluated left to right.

A task is identified by ``task_id = "<kind>/<number>"``; `problem(task_id)` rebuilds its numbers,
question, answer and the reference solution (the tool calls that solve it) from the id alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference_envs.datasets import distinct_tasks, task_rng

KINDS = ("mul_add", "add_mul")
INSTRUCTION = "Use the tools."
_OPS = {"mul_add": ("multiply", "add"), "add_mul": ("add", "multiply")}


@dataclass(frozen=True)
class Problem:
    task_id: str
    kind: str
    numbers: tuple[int, int, int]
    question: str
    answer: int

    def steps(self) -> list[tuple[str, int, int]]:
        """The reference solution: (tool, a, b) for each arithmetic step, in order."""
        a, b, c = self.numbers
        first, second = _OPS[self.kind]
        partial = apply(first, a, b)
        return [(first, a, b), (second, partial, c)]


def apply(op: str, a: int, b: int) -> int:
    return {"add": a + b, "multiply": a * b}[op]


def problem(task_id: str) -> Problem:
    """Rebuild a task from its id; ValueError for an id this env never made."""
    kind, rng = task_rng("calculator", task_id, KINDS)
    a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(101, 999)
    first, second = _OPS[kind]
    if kind == "add_mul":
        a, b, c = rng.randint(101, 999), rng.randint(101, 999), rng.randint(12, 99)
        question = f"What is ({a} + {b}) * {c}?"
    else:
        question = f"What is {a} * {b} + {c}?"
    answer = apply(second, apply(first, a, b), c)
    return Problem(task_id=task_id, kind=kind, numbers=(a, b, c), question=question, answer=answer)


def row(p: Problem, split: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"{p.question} {INSTRUCTION}"}],
        "ground_truth": p.answer,
        "metadata": {"env": "calculator", "task_id": p.task_id, "kind": p.kind, "split": split},
    }


def generate(*, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    """`n` distinct tasks of `split` (all kinds mixed unless `kind` is given)."""
    problems = distinct_tasks("calculator", problem, lambda p: p.question, kinds=KINDS, split=split, seed=seed,
                              n=n, kind=kind)
    return [row(p, split) for p in problems]


def solution(task_row: dict[str, Any]) -> list[str | tuple[str, dict[str, Any]]]:
    """The env's own solver: the two tool calls (name, arguments) of a correct episode, then the answer."""
    p = problem(str(task_row["metadata"]["task_id"]))
    return [*((op, {"a": a, "b": b}) for op, a, b in p.steps()), f"The answer is {p.answer}."]
