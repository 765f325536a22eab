"""env_sdk.graders: each grader's scores, reasons, and its refusal of bad configuration.
The LLM judge calls a real OpenAI-compatible server (tests.helpers.scripted_model_app)."""

from __future__ import annotations

import pytest

from env_sdk.graders import (
    GraderConfigError,
    GraderError,
    JsonSchemaMatch,
    LLMJudge,
    NumericMatch,
    PythonGrader,
    RegexMatch,
    StringMatch,
    TextSimilarity,
    WeightedGrader,
    extract_json,
    extract_number,
)
from env_sdk.sandbox import SandboxLimits
from tests.helpers import scripted_model_app, serve_app


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 85.", 85.0),
        ("What is 47 + 38? 47 + 38 = 85", 85.0),
        ("**85**", 85.0),
        ("\\boxed{1,234}", 1234.0),
        ("It costs $1,234.50 in total.", 1234.5),
        ("Answer: -7", -7.0),
        ("The answer is 85, because 40 + 45 = 85 and 3 more", 85.0),
        ("0.25", 0.25),
        ("no digits here", None),
        ("\\boxed{x}", None),
    ],
)
def test_extract_number(text: str, number: float | None) -> None:
    assert extract_number(text) == number


def test_extract_json_forms() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure:\n```json\n{"a": [1, 2]}\n```\nDone.') == {"a": [1, 2]}
    assert extract_json('Here it is {"b": true} hope it helps') == {"b": True}
    assert extract_json("nothing {here") is None


def test_string_match() -> None:
    g = StringMatch()
    assert g.grade("  **Paris**. ", "paris").score == 1.0
    assert g.grade("Lyon", ["Paris", "Lyon"]).score == 1.0
    r = g.grade("Berlin", "Paris")
    assert r.score == 0.0 and "does not match" in r.reason
    assert StringMatch(normalize=False).grade("paris", "Paris").score == 0.0
    with pytest.raises(GraderError, match="expected"):
        g.grade("x", None)
    with pytest.raises(GraderConfigError, match="bool"):
        StringMatch(normalize="yes")  # type: ignore[arg-type]


def test_numeric_match_with_tolerance() -> None:
    assert NumericMatch().grade("The answer is 85.", 85).score == 1.0
    assert NumericMatch().grade("84", "85").score == 0.0
    r = NumericMatch(abs_tol=0.5).grade("85.4", 85)
    assert r.score == 1.0 and r.metrics["abs_error"] == pytest.approx(0.4)
    assert NumericMatch(rel_tol=0.01).grade("1009", 1000).score == 1.0
    r = NumericMatch().grade("I don't know", 85)
    assert r.score == 0.0 and "no number" in r.reason
    with pytest.raises(GraderConfigError, match="abs_tol must be >= 0"):
        NumericMatch(abs_tol=-1)
    with pytest.raises(GraderConfigError, match="rel_tol must be a finite number"):
        NumericMatch(rel_tol=float("nan"))
    with pytest.raises(GraderError, match="not a number"):
        NumericMatch().grade("5", "five")


def test_regex_match() -> None:
    assert RegexMatch(r"\d{3}-\d{4}").grade("call 555-1234 now").score == 1.0
    assert RegexMatch(r"\d{3}-\d{4}", fullmatch=True).grade("call 555-1234 now").score == 0.0
    assert RegexMatch("yes", ignore_case=True).grade("YES").score == 1.0
    with pytest.raises(GraderConfigError, match="non-empty"):
        RegexMatch("")
    with pytest.raises(GraderConfigError, match="not a valid regex"):
        RegexMatch("(unclosed")


def test_json_schema_match() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    g = JsonSchemaMatch(schema)
    assert g.grade('```json\n{"age": 3}\n```').score == 1.0
    r = g.grade('{"age": "three"}')
    assert r.score == 0.0 and "$.age" in r.reason and "integer" in r.reason
    r = g.grade("no json")
    assert r.score == 0.0 and "no JSON" in r.reason
    with pytest.raises(GraderConfigError, match="schema is invalid at type"):
        JsonSchemaMatch({"type": "nonsense"})
    with pytest.raises(GraderConfigError, match="dict"):
        JsonSchemaMatch([1])  # type: ignore[arg-type]


def test_text_similarity() -> None:
    r = TextSimilarity().grade("the quick brown fox", "the quick brown fox!")
    assert r.score == 1.0  # normalized: edge punctuation dropped
    r = TextSimilarity().grade("the quick brown fox", "a slow green turtle")
    assert 0.0 < r.score < 0.6
    assert TextSimilarity(threshold=0.8).grade("colour", "color").score == 1.0
    assert TextSimilarity(threshold=0.99).grade("colour", "color").score == 0.0
    with pytest.raises(GraderConfigError, match="threshold must be <= 1"):
        TextSimilarity(threshold=1.5)


GRADER_CODE = """
def grade(output, expected):
    ns = {}
    exec(output, ns)          # runs what the model wrote: safe, we are in the sandbox
    ok = ns["double"](expected) == 2 * expected
    return (1.0 if ok else 0.0, "double() works" if ok else "double() is wrong")
"""


async def test_python_grader_runs_model_code_in_the_sandbox() -> None:
    g = PythonGrader(GRADER_CODE)
    r = g.grade("def double(x):\n    return 2 * x\n", 21)
    assert r.score == 1.0 and r.reason == "double() works" and "sandbox_s" in r.metrics
    r = await g.agrade("def double(x):\n    return x\n", 21)
    assert r.score == 0.0
    slow = PythonGrader(GRADER_CODE, limits=SandboxLimits(cpu_s=1, wall_s=5))
    with pytest.raises(GraderError, match="grader.py failed"):
        slow.grade("while True: pass", 1)
    with pytest.raises(GraderError, match="no valid score"):
        PythonGrader("def grade(o, e):\n    return 7\n").grade("x", None)
    with pytest.raises(GraderConfigError, match="line 2"):
        PythonGrader("def grade(o, e):\nreturn 1")
    with pytest.raises(GraderConfigError, match="no top-level function 'grade'"):
        PythonGrader("def score(o, e):\n    return 1\n")


@pytest.fixture(scope="module")
def judge_url():
    def script(messages, tools):
        text = messages[-1]["content"]
        if "RESPONSE:\nunparseable" in text:
            return "I would rather not say."
        if "RESPONSE:\nway too good" in text:
            return "Amazing. SCORE: 12"
        if "RESPONSE:\njson" in text:
            return '{"score": 0.5, "why": "ok"}'
        return "Clear and correct, mentions the rubric point.\nSCORE: 7"

    app = scripted_model_app(script)
    with serve_app(app) as url:
        yield url, app


async def test_llm_judge_scores_parses_and_fails_clearly(judge_url) -> None:
    url, app = judge_url
    judge = LLMJudge(base_url=url + "/v1", model="judge", rubric="Must mention photosynthesis.", api_key="k")
    r = judge.grade("Plants use photosynthesis.", expected="photosynthesis")
    assert r.score == pytest.approx(0.7) and r.metrics["judge_score"] == 7
    request = app.state.requests[-1]["body"]
    assert request["model"] == "judge" and request["temperature"] == 0.0
    assert "Must mention photosynthesis." in request["messages"][-1]["content"]
    assert "REFERENCE ANSWER:\nphotosynthesis" in request["messages"][-1]["content"]
    assert app.state.requests[-1]["auth"] == "Bearer k"

    r = await judge.agrade("json")
    assert r.score == pytest.approx(0.05)  # 0.5 on a 0..10 scale
    r = await LLMJudge(base_url=url + "/v1", model="judge", rubric="r", scale=1).agrade("json")
    assert r.score == pytest.approx(0.5)
    with pytest.raises(GraderError, match="has no score"):
        judge.grade("unparseable")
    with pytest.raises(GraderError, match="outside 0..10"):
        judge.grade("way too good")


def test_llm_judge_unreachable_and_config_errors() -> None:
    judge = LLMJudge(base_url="http://127.0.0.1:9/v1", model="m", rubric="r", max_retries=0, timeout_s=2)
    with pytest.raises(GraderError, match="calling http://127.0.0.1:9/v1"):
        judge.grade("x")
    with pytest.raises(GraderConfigError, match="http"):
        LLMJudge(base_url="localhost:8000", model="m", rubric="r")
    with pytest.raises(GraderConfigError, match="rubric"):
        LLMJudge(base_url="http://x/v1", model="m", rubric="  ")
    with pytest.raises(GraderConfigError, match="scale must be 1 or 10"):
        LLMJudge(base_url="http://x/v1", model="m", rubric="r", scale=5)


async def test_weighted_grader() -> None:
    g = WeightedGrader({"format": (RegexMatch(r"answer is"), 1.0), "answer": (NumericMatch(), 3.0)})
    r = g.grade("The answer is 85", 85)
    assert r.score == 1.0 and r.metrics["answer/score"] == 1.0 and "answer/abs_error" in r.metrics
    r = await g.agrade("85", 85)
    assert r.score == pytest.approx(0.75) and "format:" in r.reason and "answer:" in r.reason
    with pytest.raises(GraderConfigError, match="must be positive"):
        WeightedGrader({"a": (StringMatch(), 0.0)})
    with pytest.raises(GraderConfigError, match="non-empty"):
        WeightedGrader({})
    with pytest.raises(GraderConfigError, match="not a Grader"):
        WeightedGrader({"a": ("exact", 1.0)})  # type: ignore[dict-item]
    with pytest.raises(GraderConfigError, match="pair"):
        WeightedGrader({"a": StringMatch()})  # type: ignore[dict-item]
