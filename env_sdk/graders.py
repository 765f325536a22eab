r"""Graders: small, configurable scorers that turn a model's output into an `EvaluationResult`.

Every grader is configured once (bad configuration raises `GraderConfigError` at construction)
and then called per output: ``grader.grade(output, expected)`` or, in an event loop,
``await grader.agrade(output, expected)``. `expected` is the reference (a dataset row's
``ground_truth`` or part of it) for graders that compare against one; graders configured with
everything they need (a regex, a JSON Schema, a rubric) ignore it or use it as a hint.

A grader's score is always within [0, 1]. A grader that cannot grade (the judge endpoint is
down, its reply holds no score, a python grader crashes) raises `GraderError`: that is an error
of the rollout, not a zero.

A trainer-side evaluator built from graders::

    from env_sdk.graders import NumericMatch, RegexMatch, WeightedGrader, final_text

    GRADER = WeightedGrader({"answer": (NumericMatch(abs_tol=0.01), 0.9),
                             "format": (RegexMatch(r"\\boxed\{"), 0.1)})

    def evaluate(messages, ground_truth, info):
        return GRADER.grade(final_text(messages) or "", ground_truth)
"""

from __future__ import annotations

import ast
import asyncio
import difflib
import json
import math
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
import openai

from env_sdk.models import EvaluationResult
from env_sdk.sandbox import (
    Isolation,
    SandboxLimits,
    SandboxResult,
    run_python,
    run_python_async,
)

__all__ = [
    "Grader",
    "GraderConfigError",
    "GraderError",
    "JsonSchemaMatch",
    "LLMJudge",
    "NumericMatch",
    "PythonGrader",
    "RegexMatch",
    "StringMatch",
    "TextSimilarity",
    "WeightedGrader",
    "extract_json",
    "extract_number",
    "final_text",
    "normalize_text",
]


class GraderConfigError(ValueError):
    """A grader was constructed with a configuration it cannot work with."""


class GraderError(RuntimeError):
    """A grader could not produce a score for this output (not the same as a score of 0)."""


class Grader(ABC):
    """Base class. Subclasses implement `grade`; `agrade` runs it without blocking the loop
    where grading does I/O (subprocess, HTTP)."""

    @abstractmethod
    def grade(self, output: str, expected: Any = None) -> EvaluationResult: ...

    async def agrade(self, output: str, expected: Any = None) -> EvaluationResult:
        return self.grade(output, expected)

    def _need_expected(self, expected: Any) -> Any:
        if expected is None:
            raise GraderError(f"{type(self).__name__} needs an expected value (the row's ground_truth), got None")
        return expected


# --- text helpers -------------------------------------------------------------------------


def final_text(messages: Sequence[Any]) -> str | None:
    """The text of the conversation's last assistant message; None when there is no assistant
    message or its text is empty (e.g. it only called tools). Accepts dicts or pydantic models."""
    for message in reversed(messages):
        m = message if isinstance(message, Mapping) else message.model_dump()
        if m.get("role") == "assistant":
            content = m.get("content")
            return content if isinstance(content, str) and content.strip() else None
    return None


_PUNCT_EDGES = string.punctuation + " \t\n\r“”‘’"


def normalize_text(text: str) -> str:
    """Casefold, collapse whitespace, drop markdown emphasis and punctuation at both ends."""
    text = re.sub(r"(\*\*|__|`)", "", str(text))
    text = " ".join(text.split()).casefold()
    return text.strip(_PUNCT_EDGES)


_NUMBER = r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*(" + _NUMBER + ")", re.IGNORECASE)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}``, with nested braces."""
    out: list[str] = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[match.end(): i - 1])
    return out


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("$", ""))


def extract_number(text: str) -> float | None:
    """The final numeric answer in a model's text, or None.

    Looks, in order, at the last ``\\boxed{...}``, the last "answer is N" / "Answer: N", and the
    last number anywhere. Tolerates thousands separators, ``$``, markdown ``**``, a trailing
    period: "The answer is **$1,234**." -> 1234.0.
    """
    text = re.sub(r"(\*\*|__|`)", "", str(text))
    boxed = _boxed_contents(text)
    if boxed:
        numbers = _NUMBER_RE.findall(boxed[-1])
        return _to_float(numbers[-1]) if numbers else None
    answers = _ANSWER_RE.findall(text)
    if answers:
        return _to_float(answers[-1])
    numbers = _NUMBER_RE.findall(text)
    return _to_float(numbers[-1]) if numbers else None


_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON value in a model's text: the whole text, else the last fenced block, else the
    first ``{...}`` / ``[...]`` that decodes. Returns None when there is none."""
    text = str(text).strip()
    candidates = [text, *reversed(_FENCE_RE.findall(text))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        return value
    return None


def _finite(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GraderConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise GraderConfigError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise GraderConfigError(f"{name} must be <= {maximum}, got {value!r}")
    return float(value)


# --- graders --------------------------------------------------------------------------------


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
        self.abs_tol = _finite("NumericMatch abs_tol", abs_tol, minimum=0.0)
        self.rel_tol = _finite("NumericMatch rel_tol", rel_tol, minimum=0.0)

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        expected = self._need_expected(expected)
        try:
            want = _to_float(str(expected)) if isinstance(expected, str) else float(expected)
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
        self.threshold = None if threshold is None else _finite("TextSimilarity threshold", threshold,
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


# The python grader's harness: runs in the sandbox beside the user's grader.py.
_PY_HARNESS = """\
import json, sys
payload = json.load(sys.stdin)
out = sys.stdout
sys.stdout = sys.stderr
import grader
result = getattr(grader, payload["function"])(payload["output"], payload["expected"])
if isinstance(result, tuple):
    result = {"score": result[0], "reason": result[1] if len(result) > 1 else ""}
elif not isinstance(result, dict):
    result = {"score": result}
out.write("\\n" + json.dumps(result, default=str) + "\\n")
"""


class PythonGrader(Grader):
    """Author-written python, run in the sandbox (`env_sdk.sandbox`), so that it may safely
    execute what the model wrote.

    `code` must define ``def grade(output, expected)`` (or the name given as `function`)
    returning a score, a ``(score, reason)`` tuple, or ``{"score", "reason", "metrics"}``.
    """

    def __init__(self, code: str, *, function: str = "grade", limits: SandboxLimits | None = None,
                 isolation: Isolation = "auto") -> None:
        if not isinstance(code, str) or not code.strip():
            raise GraderConfigError("PythonGrader code must be non-empty python source")
        try:
            tree = ast.parse(code, filename="grader.py")
        except SyntaxError as exc:
            raise GraderConfigError(f"PythonGrader code does not parse: grader.py line {exc.lineno}: {exc.msg}") from None
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if function not in names:
            raise GraderConfigError(f"PythonGrader code defines no top-level function {function!r} "
                                    f"(found: {sorted(names) or 'none'})")
        self.code, self.function = code, function
        self.limits = limits or SandboxLimits()
        self.isolation = isolation

    def _args(self, output: str, expected: Any) -> dict[str, Any]:
        try:
            stdin = json.dumps({"function": self.function, "output": output, "expected": expected})
        except TypeError as exc:
            raise GraderError(f"PythonGrader: expected value is not JSON-serializable: {exc}") from None
        return {"stdin": stdin, "files": {"grader.py": self.code}, "limits": self.limits,
                "isolation": self.isolation}

    def _result(self, run: SandboxResult) -> EvaluationResult:
        if not run.ok:
            raise GraderError(f"PythonGrader: grader.py failed ({run.isolation} sandbox): {run.describe()}")
        try:
            data = json.loads(run.stdout.strip().splitlines()[-1])
            score = float(data["score"])
            result = EvaluationResult(score=score, reason=str(data.get("reason", "")),
                                      metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()})
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            raise GraderError(f"PythonGrader: {self.function}() returned no valid score "
                              f"(a number in [0, 1]): {exc}; stdout tail {run.stdout[-200:]!r}") from None
        result.metrics.setdefault("sandbox_s", run.wall_s)
        return result

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        return self._result(run_python(_PY_HARNESS, **self._args(output, expected)))

    async def agrade(self, output: str, expected: Any = None) -> EvaluationResult:
        return self._result(await run_python_async(_PY_HARNESS, **self._args(output, expected)))


_JUDGE_SYSTEM = (
    "You are a strict, fair grader. Judge the RESPONSE only by the RUBRIC. Write one or two "
    "sentences of justification, then end with a final line of the form `SCORE: <number>`."
)
_SCORE_PATTERNS = [
    re.compile(r"\"score\"\s*:\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*(?:10|1)\b"),
    re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*$"),
]


class LLMJudge(Grader):
    """A model behind any OpenAI-compatible endpoint grades the output against a rubric.

    The judge is asked for a score from 0 to ``scale`` (1 or 10); the result is divided by
    ``scale``. A reply without a parseable score, or one outside 0..scale, raises `GraderError`.
    """

    def __init__(self, *, base_url: str, model: str, rubric: str, api_key: str | None = None,
                 scale: int = 10, temperature: float = 0.0, max_tokens: int = 256,
                 timeout_s: float = 60.0, max_retries: int = 2) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise GraderConfigError(f"LLMJudge base_url must be an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise GraderConfigError("LLMJudge model must be a non-empty string")
        if not isinstance(rubric, str) or not rubric.strip():
            raise GraderConfigError("LLMJudge rubric must be a non-empty string")
        if scale not in (1, 10):
            raise GraderConfigError(f"LLMJudge scale must be 1 or 10, got {scale!r}")
        self.base_url, self.model, self.rubric, self.scale = base_url, model, rubric, scale
        self.api_key = api_key or "none"
        self.temperature = _finite("LLMJudge temperature", temperature, minimum=0.0)
        self.max_tokens = int(_finite("LLMJudge max_tokens", max_tokens, minimum=1))
        self.timeout_s = _finite("LLMJudge timeout_s", timeout_s, minimum=0.001)
        self.max_retries = int(_finite("LLMJudge max_retries", max_retries, minimum=0))

    def messages(self, output: str, expected: Any = None) -> list[dict[str, str]]:
        parts = [f"RUBRIC:\n{self.rubric}"]
        if expected is not None:
            parts.append(f"REFERENCE ANSWER:\n{expected}")
        parts.append(f"RESPONSE:\n{output}")
        parts.append(f"Score the RESPONSE from 0 to {self.scale}. End with `SCORE: <number>`.")
        return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]

    def _request(self, output: str, expected: Any) -> dict[str, Any]:
        return {"model": self.model, "messages": self.messages(output, expected),
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def parse(self, reply: str | None) -> EvaluationResult:
        """Score from the judge's reply text (the last match of the first pattern that matches)."""
        text = (reply or "").strip()
        for pattern in _SCORE_PATTERNS:
            found = pattern.findall(text)
            if found:
                value = float(found[-1])
                if not 0.0 <= value <= self.scale:
                    raise GraderError(f"LLMJudge: score {value:g} is outside 0..{self.scale} in reply {text[-200:]!r}")
                reason = text.splitlines()[0][:300] if text else ""
                return EvaluationResult(score=value / self.scale, reason=reason, metrics={"judge_score": value})
        raise GraderError(f"LLMJudge: the judge's reply has no score (expected a final line "
                          f"'SCORE: <0..{self.scale}>'): {text[-300:]!r}")

    def _fail(self, exc: openai.OpenAIError) -> GraderError:
        return GraderError(f"LLMJudge: calling {self.base_url} (model {self.model!r}) failed: {exc}")

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        with openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                           max_retries=self.max_retries) as client:
            try:
                completion = client.chat.completions.create(**self._request(output, expected))
            except openai.OpenAIError as exc:
                raise self._fail(exc) from exc
        return self.parse(completion.choices[0].message.content)

    async def agrade(self, output: str, expected: Any = None) -> EvaluationResult:
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                                      max_retries=self.max_retries) as client:
            try:
                completion = await client.chat.completions.create(**self._request(output, expected))
            except openai.OpenAIError as exc:
                raise self._fail(exc) from exc
        return self.parse(completion.choices[0].message.content)


class WeightedGrader(Grader):
    """Weighted mean of named graders: ``WeightedGrader({"format": (RegexMatch(...), 0.2),
    "answer": (NumericMatch(), 0.8)})``. Every grader sees the same output and expected value.
    Metrics: ``<name>/score`` and each grader's metrics as ``<name>/<metric>``."""

    def __init__(self, graders: Mapping[str, tuple[Grader, float]]) -> None:
        if not isinstance(graders, Mapping) or not graders:
            raise GraderConfigError("WeightedGrader needs a non-empty mapping name -> (grader, weight)")
        self.graders: dict[str, tuple[Grader, float]] = {}
        for name, entry in graders.items():
            if not isinstance(entry, Sequence) or len(entry) != 2:
                raise GraderConfigError(f"WeightedGrader entry {name!r} must be a (grader, weight) pair, got {entry!r}")
            grader, weight = entry
            if not isinstance(grader, Grader):
                raise GraderConfigError(f"WeightedGrader entry {name!r}: {grader!r} is not a Grader")
            weight = _finite(f"WeightedGrader weight of {name!r}", weight)
            if weight <= 0:
                raise GraderConfigError(f"WeightedGrader weight of {name!r} must be positive, got {weight!r}")
            self.graders[str(name)] = (grader, weight)
        self.total = sum(w for _, w in self.graders.values())

    def _combine(self, results: dict[str, EvaluationResult]) -> EvaluationResult:
        score = sum(results[n].score * w for n, (_, w) in self.graders.items()) / self.total
        metrics: dict[str, float] = {}
        for name, result in results.items():
            metrics[f"{name}/score"] = result.score
            metrics.update({f"{name}/{k}": v for k, v in result.metrics.items()})
        reason = "; ".join(f"{name}: {r.reason}" for name, r in results.items())
        return EvaluationResult(score=min(1.0, max(0.0, score)), reason=reason, metrics=metrics)

    def grade(self, output: str, expected: Any = None) -> EvaluationResult:
        return self._combine({n: g.grade(output, expected) for n, (g, _) in self.graders.items()})

    async def agrade(self, output: str, expected: Any = None) -> EvaluationResult:
        names = list(self.graders)
        results = await asyncio.gather(*(self.graders[n][0].agrade(output, expected) for n in names))
        return self._combine(dict(zip(names, results)))
