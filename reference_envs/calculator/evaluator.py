"""Scoring for calculator: 1 when the integer passed to submit_answer equals the expected result,
else 0 (no submission, or a wrong number). The env server and the trainer-side evaluator both call
`grade`."""

from __future__ import annotations

import json
from typing import Any

from env_sdk import EvaluationResult

SUBMIT = "submit_answer"


def submitted(messages: list[Any]) -> Any:
    """The last answer passed to submit_answer, or None."""
    for message in reversed(messages):
        m = message if isinstance(message, dict) else message.model_dump()
        for call in reversed(m.get("tool_calls") or []):
            function = call.get("function") or {}
            if function.get("name") == SUBMIT:
                try:
                    args = json.loads(function.get("arguments") or "{}")
                except json.JSONDecodeError:
                    return None
                return args.get("answer") if isinstance(args, dict) else None
    return None


def grade(messages: list[Any], expected: int) -> EvaluationResult:
    answer = submitted(messages)
    if answer is None:
        return EvaluationResult(score=0.0, reason="no answer: submit_answer was never called with one")
    try:
        value = float(str(answer).replace(",", ""))
    except ValueError:
        return EvaluationResult(score=0.0, reason=f"the answer {answer!r} is not a number")
    ok = value == expected
    return EvaluationResult(score=1.0 if ok else 0.0, reason="correct" if ok else f"expected {expected}, got {answer}")


def evaluate(messages: list[Any], ground_truth: Any, info: dict[str, Any] | None = None) -> EvaluationResult:
    """Trainer-side evaluator (`reference_envs.calculator.evaluator:evaluate`)."""
    if ground_truth is None:
        raise ValueError("calculator evaluator: the dataset row has no ground_truth (the expected number)")
    return grade(messages, int(ground_truth))
