"""Scoring for the code env: run the solution against hidden test cases in the sandbox
(`env_sdk.run_python`); score = fraction of cases whose output equals the expected one.

The expected outputs never enter the sandbox: the harness there only calls the function on each
case's inputs and writes the JSON-encoded results, one line per case, to a descriptor the
solution's own prints do not go to; this process compares them. So a solution can only score by
computing the right values, not by printing "passed" or returning an object that claims to be
equal to everything. The env server and the trainer-side evaluator both call `grade`/`agrade`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from env_sdk import (
    EvaluationResult,
    SandboxLimits,
    SandboxResult,
    final_text,
    run_python,
    run_python_async,
)

SUBMIT = "submit_solution"
#: Limits for one grading run (all cases of one solution).
GRADING_LIMITS = SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=512, max_processes=16)

_HARNESS = """\
import json, os, sys
spec = json.load(open("cases.json"))
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr
try:
    import solution
    fn = getattr(solution, spec["function"])
except BaseException as exc:
    out.write(json.dumps({"load_error": f"{type(exc).__name__}: {exc}"[:300]}) + "\\n")
    out.flush()
    raise SystemExit(0)
for i, args in enumerate(spec["args"]):
    try:
        line = json.dumps({"i": i, "value": fn(*args)})
    except BaseException as exc:
        line = json.dumps({"i": i, "error": f"{type(exc).__name__}: {exc}"[:300]})
    out.write(line + "\\n")
    out.flush()
"""

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The last fenced code block, else the whole text when it is Python that defines a function."""
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1]
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    return text if any(isinstance(n, ast.FunctionDef) for n in tree.body) else None


def submitted_code(messages: list[Any]) -> tuple[str | None, str]:
    """(the solution: the last submit_solution call's code, else a code block in the final
    answer; or None and why)."""
    for message in reversed(messages):
        m = message if isinstance(message, dict) else message.model_dump()
        for call in reversed(m.get("tool_calls") or []):
            function = call.get("function") or {}
            if function.get("name") == SUBMIT:
                try:
                    code = json.loads(function.get("arguments") or "{}").get("code")
                except (json.JSONDecodeError, AttributeError):
                    return None, "submit_solution was called with arguments that are not a JSON object"
                if not isinstance(code, str) or not code.strip():
                    return None, "submit_solution was called without code"
                return code, ""
    text = final_text(messages)
    code = extract_code(text) if text else None
    if code is None:
        return None, "no code: neither a submit_solution call nor a ```python block in the last answer"
    return code, ""


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def _request(code: str, function: str, cases: list[dict[str, Any]]) -> dict[str, Any]:
    spec = {"function": function, "args": [c["args"] for c in cases]}
    return {"files": {"solution.py": code, "cases.json": json.dumps(spec)}}


def _score(run: SandboxResult, function: str, cases: list[dict[str, Any]]) -> EvaluationResult:
    results: dict[int, dict[str, Any]] = {}
    load_error = None
    for line in run.stdout.splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and "load_error" in item:
            load_error = load_error or str(item["load_error"])
        elif isinstance(item, dict) and isinstance(item.get("i"), int):
            results.setdefault(item["i"], item)
    passed, first_failure = 0, ""
    for i, case in enumerate(cases):
        got = results.get(i)
        if got is not None and "value" in got and _same(got["value"], case["expected"]):
            passed += 1
        elif not first_failure:
            call = f"{function}({', '.join(map(repr, case['args']))})"
            if got is None:
                first_failure = f"{call} gave no result"
            elif "error" in got:
                first_failure = f"{call} raised {got['error']}"
            else:
                first_failure = f"{call} returned {got['value']!r}, expected {case['expected']!r}"
    total = len(cases)
    if load_error:
        reason = f"the solution failed to load: {load_error}"
    elif passed == total:
        reason = f"all {total} tests passed"
    else:
        reason = f"{passed}/{total} tests passed; first failure: {first_failure}"
        if not run.ok:
            reason += f"; the run {run.describe()}"
    metrics = {"tests_passed": float(passed), "tests_total": float(total), "sandbox_s": run.wall_s}
    return EvaluationResult(score=passed / total, reason=f"{reason} [sandbox: {run.isolation}]", metrics=metrics)


def _check(function: str, cases: list[dict[str, Any]]) -> None:
    if not cases:
        raise ValueError(f"code grading of {function!r}: no test cases")


def grade(code: str, function: str, cases: list[dict[str, Any]],
          limits: SandboxLimits = GRADING_LIMITS) -> EvaluationResult:
    _check(function, cases)
    return _score(run_python(_HARNESS, limits=limits, **_request(code, function, cases)), function, cases)


async def agrade(code: str, function: str, cases: list[dict[str, Any]],
                 limits: SandboxLimits = GRADING_LIMITS) -> EvaluationResult:
    _check(function, cases)
    run = await run_python_async(_HARNESS, limits=limits, **_request(code, function, cases))
    return _score(run, function, cases)


def evaluate(messages: list[Any], ground_truth: Any, info: dict[str, Any] | None = None) -> EvaluationResult:
    """Trainer-side evaluator (`reference_envs.code.evaluator:evaluate`); ground_truth is
    ``{"function": name, "cases": [{"args": [...], "expected": ...}]}``."""
    if not isinstance(ground_truth, dict) or not {"function", "cases"} <= set(ground_truth):
        raise ValueError("code evaluator: ground_truth must be {'function': ..., 'cases': [...]}, "
                         f"got {type(ground_truth).__name__}")
    code, why = submitted_code(messages)
    if code is None:
        return EvaluationResult(score=0.0, reason=why)
    return grade(code, ground_truth["function"], ground_truth["cases"])
