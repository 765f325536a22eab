"""A grader written in Python by the env author, run in the sandbox."""

from __future__ import annotations

import ast
import json
from typing import Any

from env_sdk.graders._base import Grader, GraderConfigError, GraderError
from env_sdk.models import EvaluationResult
from env_sdk.sandbox import (
    Isolation,
    SandboxLimits,
    SandboxResult,
    run_python,
    run_python_async,
)

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
