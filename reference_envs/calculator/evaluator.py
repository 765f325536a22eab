"""Scoring for calculator: 1 when the last number in the model's final text answer equals the
expected result, else 0. The env server and the trainer-side evaluator both call `grade`."""

from __future__ import annotations

from typing import Any

from env_sdk import EvaluationResult, NumericMatch, final_text

_MATCH = NumericMatch(abs_tol=1e-6)


def grade(messages: list[Any], expected: int) -> EvaluationResult:
    text = final_text(messages)
    if text is None:
        return EvaluationResult(score=0.0, reason="no answer: the last assistant message has no text")
    return _MATCH.grade(text, expected)


def evaluate(messages: list[Any], ground_truth: Any, info: dict[str, Any] | None = None) -> EvaluationResult:
    """Trainer-side evaluator (`reference_envs.calculator.evaluator:evaluate`)."""
    if ground_truth is None:
        raise ValueError("calculator evaluator: the dataset row has no ground_truth (the expected number)")
    return grade(messages, int(ground_truth))
