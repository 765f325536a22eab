"""Reading a model's output: the final answer's text, normalised text, the final number, the JSON value."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any


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


def to_float(token: str) -> float:
    """A number token as found by `extract_number` (thousands separators, `$`) as a float."""
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
        return to_float(numbers[-1]) if numbers else None
    answers = _ANSWER_RE.findall(text)
    if answers:
        return to_float(answers[-1])
    numbers = _NUMBER_RE.findall(text)
    return to_float(numbers[-1]) if numbers else None


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
