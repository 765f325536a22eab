"""Graders that compare the output with an expected value or check it against a pattern or schema."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from env_sdk.graders._base import Grader, GraderConfigError, GraderError, finite
from env_sdk.graders._text import extract_json, extract_number, normalize_text, to_float
from env_sdk.models import EvaluationResult


class StringMatch(Grader):
    """1 if the output equals the expected string (or any of a list of them), else 0.

    ``normalize=True`` compares `normalize_text` forms (case, whitespace, edge punctuation);
    ``normalize=False`` compares exactly (after stripping surrounding whitespace only).
    """

    def __init__(self, *, normalize: bool = True) -> None:
        if not isinstance(normalize, bool):
            raise GraderConfigError(f"StringMatch normalize must be a bool, got {normalize!r}")
        self.normalize = normalize

    def _form(self, text: Any) -> str:
        return normalize_text(text) if self.normalize else str(text).strip()

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        expected = self._need_expected(expected)
        options = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        if not options:
            raise GraderError("StringMatch: expected is an empty list")
        got = self._form(output)
        for option in options:
            if got == self._form(option):
                return EvaluationResult(score=1.0, reason=f"matches {option!r}")
        shown = options[0] if len(options) == 1 else options
        return EvaluationResult(score=0.0, reason=f"{str(output)[:200]!r} does not match {shown!r}")


class NumericMatch(Grader):
    """1 if the number extracted from the output (`extract_number`) is close to the expected one.

    Close = within ``abs_tol`` or within ``rel_tol`` of the expected magnitude (math.isclose).
    """

    def __init__(self, *, abs_tol: float = 1e-6, rel_tol: float = 0.0) -> None:
        self.abs_tol = finite("NumericMatch abs_tol", abs_tol, minimum=0.0)
        self.rel_tol = finite("NumericMatch rel_tol", rel_tol, minimum=0.0)

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        expected = self._need_expected(expected)
        try:
            want = to_float(str(expected)) if isinstance(expected, str) else float(expected)
        except (TypeError, ValueError):
            raise GraderError(f"NumericMatch: expected value {expected!r} is not a number") from None
        got = extract_number(output)
        if got is None:
            return EvaluationResult(score=0.0, reason=f"no number found in the output {str(output)[-200:]!r}")
        error = abs(got - want)
        ok = math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        shown_got = int(got) if got.is_integer() else got
        reason = f"answer {shown_got} {'==' if ok else '!='} expected {expected}"
        return EvaluationResult(score=1.0 if ok else 0.0, reason=reason, metrics={"abs_error": error})


class RegexMatch(Grader):
    """1 if the regular expression matches the output (``search`` anywhere, or ``fullmatch``)."""

    def __init__(self, pattern: str, *, fullmatch: bool = False, ignore_case: bool = False) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise GraderConfigError(f"RegexMatch pattern must be a non-empty string, got {pattern!r}")
        try:
            self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise GraderConfigError(f"RegexMatch pattern {pattern!r} is not a valid regex: {exc}") from None
        self.fullmatch = fullmatch

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        text = str(output).strip() if self.fullmatch else str(output)
        match = self.regex.fullmatch(text) if self.fullmatch else self.regex.search(text)
        how = "fully matches" if self.fullmatch else "matches"
        if match:
            return EvaluationResult(score=1.0, reason=f"output {how} /{self.regex.pattern}/")
        return EvaluationResult(score=0.0, reason=f"output does not {how.split()[-1]} /{self.regex.pattern}/")


class JsonSchemaMatch(Grader):
    """1 if the output holds JSON (`extract_json`) that validates against the schema, else 0."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        if not isinstance(schema, Mapping):
            raise GraderConfigError(f"JsonSchemaMatch schema must be a JSON object (dict), got {type(schema).__name__}")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(map(str, exc.path)) or "(root)"
            raise GraderConfigError(f"JsonSchemaMatch schema is invalid at {where}: {exc.message}") from None
        self.schema = dict(schema)
        self.validator = cls(self.schema)

    def validate(self, value: Any) -> str | None:
        """None if `value` is valid, else a one-line description of the first error."""
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
        if not errors:
            return None
        first = errors[0]
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in first.path)
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"at {where}: {first.message}{more}"

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        value = extract_json(output)
        if value is None:
            return EvaluationResult(score=0.0, reason="no JSON found in the output", metrics={"schema_valid": 0.0})
        error = self.validate(value)
        if error:
            return EvaluationResult(score=0.0, reason=f"JSON does not match the schema {error}",
                                    metrics={"schema_valid": 0.0})
        return EvaluationResult(score=1.0, reason="JSON matches the schema", metrics={"schema_valid": 1.0})


class TextSimilarity(Grader):
    """Similarity of output and expected text (difflib's ratio, 0..1) as the score, or 1/0
    against ``threshold`` when one is given."""

    def __init__(self, *, threshold: float | None = None, normalize: bool = True) -> None:
        self.threshold = None if threshold is None else finite("TextSimilarity threshold", threshold,
                                                                  minimum=0.0, maximum=1.0)
        self.normalize = normalize

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        expected = self._need_expected(expected)
        a, b = (normalize_text(x) if self.normalize else str(x) for x in (output, expected))
        ratio = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
        if self.threshold is None:
            return EvaluationResult(score=ratio, reason=f"similarity {ratio:.3f}", metrics={"similarity": ratio})
        ok = ratio >= self.threshold
        return EvaluationResult(score=1.0 if ok else 0.0, metrics={"similarity": ratio},
                                reason=f"similarity {ratio:.3f} {'>=' if ok else '<'} threshold {self.threshold}")
