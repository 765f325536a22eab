"""The final reward of a rollout: a trainer-side evaluator when one is configured, else the env's.

A trainer-side evaluator is `module:function` with the signature
    evaluate(messages: list[dict], ground_truth: Any, info: dict) -> EvaluationResult | float
(sync or async). It sees the task's `ground_truth`, which is never sent to the env. A score that
is missing, NaN or outside [0, 1] -- or an evaluator that raises -- fails the rollout with
SCORE_INVALID; scores are never clamped.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from env_sdk.models import EvaluationResult

#: A trainer-side evaluator: (messages, ground_truth, info) -> EvaluationResult | float, sync or async.
#: (An env-side one, `env_sdk.Evaluator`, gets the task and messages: the env never sees ground_truth.)
TrainerEvaluator = Callable[[list[dict[str, Any]], Any, dict[str, Any]], Any]


class ScoreInvalid(Exception):
    """The rollout's score is unusable; the message says why (it becomes the SCORE_INVALID status)."""


class EvaluatorLoadError(ValueError):
    """The configured `module:function` cannot be imported or is not callable."""


@dataclass
class Score:
    reward: float
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def load_evaluator(spec: str) -> TrainerEvaluator:
    """Import `module:function` from the working directory or the installed packages. The working
    directory is put on the import path (as uvicorn does): a console script like `openrft` does not
    have it there, and a user's evaluator usually lives next to their config."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvaluatorLoadError(f"evaluator must look like 'module:function', got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvaluatorLoadError(f"evaluator {spec!r}: cannot import {module_name!r}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise EvaluatorLoadError(f"evaluator {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise EvaluatorLoadError(f"evaluator {spec!r} is not callable")
    return fn  # type: ignore[return-value]


def _check(value: Any, source: str) -> Score:
    if isinstance(value, EvaluationResult):
        return Score(value.score, value.reason, dict(value.metrics))
    if value is None:
        raise ScoreInvalid(f"{source} returned no score")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScoreInvalid(f"{source} returned {type(value).__name__} {value!r}, not a score")
    score = float(value)
    if math.isnan(score) or not 0.0 <= score <= 1.0:
        raise ScoreInvalid(f"{source} returned score {score!r}, outside [0, 1]")
    return Score(score)


async def score_rollout(
    evaluator: TrainerEvaluator | None,
    messages: list[dict[str, Any]],
    ground_truth: Any,
    info: dict[str, Any],
    env_reward: float | None,
) -> Score:
    """The rollout's reward, or ScoreInvalid."""
    if evaluator is None:
        return _check(env_reward, "the env")
    try:
        if inspect.iscoroutinefunction(evaluator):
            value = await evaluator(messages, ground_truth, info)
        else:  # a slow sync evaluator (say, one running tests) must not stall the gateway's loop
            value = await asyncio.to_thread(evaluator, messages, ground_truth, info)
            if inspect.isawaitable(value):
                value = await value
    except ScoreInvalid:
        raise
    except Exception as exc:  # pydantic's range check on EvaluationResult lands here too
        raise ScoreInvalid(f"evaluator raised {type(exc).__name__}: {exc}") from exc
    return _check(value, "the evaluator")
