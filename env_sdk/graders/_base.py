"""What every grader is: the base class, its two errors, and the check of configuration values."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from env_sdk.models import EvaluationResult


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



def finite(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a float when it is a finite number within the bounds; else GraderConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GraderConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise GraderConfigError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise GraderConfigError(f"{name} must be <= {maximum}, got {value!r}")
    return float(value)
