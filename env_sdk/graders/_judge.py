"""A model behind an OpenAI-compatible endpoint as the grader."""

from __future__ import annotations

import re
from typing import Any

import openai

from env_sdk.graders._base import Grader, GraderConfigError, GraderError, finite
from env_sdk.models import EvaluationResult

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
        self.temperature = finite("LLMJudge temperature", temperature, minimum=0.0)
        self.max_tokens = int(finite("LLMJudge max_tokens", max_tokens, minimum=1))
        self.timeout_s = finite("LLMJudge timeout_s", timeout_s, minimum=0.001)
        self.max_retries = int(finite("LLMJudge max_retries", max_retries, minimum=0))

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
