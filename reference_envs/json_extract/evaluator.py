"""Scoring for json_extract: score = schema validity (a 0/1 gate) x field accuracy.

The JSON object is taken from the model's last answer (bare, fenced, or embedded in text). If it
does not validate against the task's JSON Schema the score is 0, with the first violation as the
reason. Otherwise each expected field scores when equal: strings case-, whitespace- and
punctuation-insensitively, numbers within 0.01, booleans exactly. The env server and the
trainer-side evaluator both call `grade`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from env_sdk import (
    EvaluationResult,
    JsonSchemaMatch,
    extract_json,
    final_text,
    normalize_text,
)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and math.isclose(got, want, abs_tol=0.01)
    if isinstance(want, str) and isinstance(got, str):
        if normalize_text(got) == normalize_text(want):
            return True
        squash = lambda s: re.sub(r"[\W_]+", "", s).casefold()
        return squash(got) == squash(want)
    return bool(got == want)


def grade(messages: list[Any], schema: dict[str, Any], fields: dict[str, Any]) -> EvaluationResult:
    text = final_text(messages)
    if text is None:
        return EvaluationResult(score=0.0, reason="no answer: the last assistant message has no text",
                                metrics={"schema_valid": 0.0, "field_accuracy": 0.0})
    value = extract_json(text)
    if value is None:
        return EvaluationResult(score=0.0, reason="no JSON object in the answer",
                                metrics={"schema_valid": 0.0, "field_accuracy": 0.0})
    error = JsonSchemaMatch(schema).validate(value)
    if error:
        return EvaluationResult(score=0.0, reason=f"JSON does not match the schema {error}",
                                metrics={"schema_valid": 0.0, "field_accuracy": 0.0})
    wrong = [k for k, want in fields.items() if not _same(value.get(k), want)]
    accuracy = 1 - len(wrong) / len(fields)
    reason = "all fields correct" if not wrong else "wrong: " + ", ".join(
        f"{k}={value.get(k)!r} (expected {fields[k]!r})" for k in wrong)
    return EvaluationResult(score=accuracy, reason=reason, metrics={"schema_valid": 1.0, "field_accuracy": accuracy})


def evaluate(messages: list[Any], ground_truth: Any, info: dict[str, Any] | None = None) -> EvaluationResult:
    """Trainer-side evaluator (`reference_envs.json_extract.evaluator:evaluate`);
    ground_truth is ``{"schema": {...}, "fields": {...}}``."""
    if not isinstance(ground_truth, dict) or not {"schema", "fields"} <= set(ground_truth):
        raise ValueError("json_extract evaluator: ground_truth must be {'schema': ..., 'fields': ...}, "
                         f"got {type(ground_truth).__name__}")
    return grade(messages, ground_truth["schema"], ground_truth["fields"])
