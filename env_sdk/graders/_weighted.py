"""Several graders as one score."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from env_sdk.graders._base import Grader, GraderConfigError, finite
from env_sdk.models import EvaluationResult


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
            weight = finite(f"WeightedGrader weight of {name!r}", weight)
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
