"""Scoring for sql_tools: the answer given to `submit_answer` against the reference query's
result. Numbers match within 0.01 (formatting such as `1,234.50` or `$` is fine); names match
case- and whitespace-insensitively. No submission scores 0. The env server and the
trainer-side evaluator both call `grade`."""

from __future__ import annotations

import json
from typing import Any

from env_sdk import EvaluationResult, NumericMatch, StringMatch
from reference_envs.sql_tools.tools import SUBMIT

_NUMBER = NumericMatch(abs_tol=0.01)
_NAME = StringMatch()


def submitted_answer(messages: list[Any]) -> tuple[str | None, str]:
    """(the last answer passed to submit_answer, or None; why None)."""
    for message in reversed(messages):
        m = message if isinstance(message, dict) else message.model_dump()
        for call in reversed(m.get("tool_calls") or []):
            function = call.get("function") or {}
            if function.get("name") != SUBMIT:
                continue
            try:
                args = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                return None, "submit_answer was called with arguments that are not JSON"
            if not isinstance(args, dict) or args.get("answer") in (None, ""):
                return None, "submit_answer was called without an answer"
            return str(args["answer"]), ""
    return None, "no answer: submit_answer was never called"


def grade(messages: list[Any], expected: Any) -> EvaluationResult:
    answer, why = submitted_answer(messages)
    if answer is None:
        return EvaluationResult(score=0.0, reason=why)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return _NUMBER.grade(answer, expected)
    return _NAME.grade(answer, str(expected))


def evaluate(messages: list[Any], ground_truth: Any, info: dict[str, Any] | None = None) -> EvaluationResult:
    """Trainer-side evaluator (`reference_envs.sql_tools.evaluator:evaluate`)."""
    if ground_truth is None:
        raise ValueError("sql_tools evaluator: the dataset row has no ground_truth (the reference answer)")
    return grade(messages, ground_truth)
