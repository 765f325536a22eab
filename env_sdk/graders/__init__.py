r"""Graders: small, configurable scorers that turn a model's output into an `EvaluationResult`.

Every grader is configured once (bad configuration raises `GraderConfigError` at construction)
and then called per output: ``grader.grade(output, expected)`` or, in an event loop,
``await grader.agrade(output, expected)``. `expected` is the reference (a dataset row's
``ground_truth`` or part of it) for graders that compare against one; graders configured with
everything they need (a regex, a JSON Schema, a rubric) ignore it or use it as a hint.

A grader's score is always within [0, 1]. A grader that cannot grade (the judge endpoint is
down, its reply holds no score, a python grader crashes) raises `GraderError`: that is an error
of the rollout, not a zero.

Modules: `_base` (the base class, its errors), `_text` (reading a model's output), `_match`
(comparisons, patterns, schemas), `_python` (author code in the sandbox), `_judge` (an LLM),
`_weighted` (several as one). Everything here is also importable from `env_sdk`.

A trainer-side evaluator built from graders::

    from env_sdk import NumericMatch, RegexMatch, WeightedGrader, final_text

    GRADER = WeightedGrader({"answer": (NumericMatch(abs_tol=0.01), 0.9),
                             "format": (RegexMatch(r"\\boxed\{"), 0.1)})

    def evaluate(messages, ground_truth, info):
        return GRADER.grade(final_text(messages) or "", ground_truth)
"""

from env_sdk.graders._base import Grader, GraderConfigError, GraderError
from env_sdk.graders._judge import LLMJudge
from env_sdk.graders._match import (
    JsonSchemaMatch,
    NumericMatch,
    RegexMatch,
    StringMatch,
    TextSimilarity,
)
from env_sdk.graders._python import PythonGrader
from env_sdk.graders._text import (
    extract_json,
    extract_number,
    final_text,
    normalize_text,
)
from env_sdk.graders._weighted import WeightedGrader

__all__ = [  # noqa: RUF022 - by module
    # _base
    "Grader",
    "GraderConfigError",
    "GraderError",
    # _text: reading a model's output
    "final_text",
    "normalize_text",
    "extract_number",
    "extract_json",
    # _match: comparisons, patterns, schemas
    "StringMatch",
    "NumericMatch",
    "RegexMatch",
    "JsonSchemaMatch",
    "TextSimilarity",
    # _python, _judge, _weighted
    "PythonGrader",
    "LLMJudge",
    "WeightedGrader",
]
