"""tool_agent end to end: a real env server built from typed tools + an evaluator, a scripted
OpenAI-compatible model that calls tools and then answers, the SDK client on the trainer side."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from env_sdk import (
    EnvClient,
    EvaluationResult,
    InitRequest,
    RolloutMetadata,
    RolloutTask,
    StatusCode,
    StatusResponse,
    ToolError,
    create_env_app,
    function_tool_spec,
    tool_agent,
)
from tests.helpers import scripted_model_app, serve_app

# --- the env: a tiny calculator with a submit tool ------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend
        b: the second addend
    """
    return a + b


async def divide(a: float, b: float) -> float:
    """Divide a by b."""
    if b == 0:
        raise ToolError("division by zero")
    return a / b


def explode() -> str:
    """A tool with a bug in it."""
    raise RuntimeError("tool bug")


def submit(answer: str) -> str:
    """Submit the final answer."""
    return "submitted"


def grade(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult:
    """Reward 1 when the last assistant text or submitted answer contains the expected value."""
    expected = str(task.task_metadata.get("expect"))
    said = [m.get("content") or "" for m in messages if m["role"] == "assistant"]
    said += [json.loads(c["function"]["arguments"]).get("answer", "") for m in messages
             for c in m.get("tool_calls") or [] if c["function"]["name"] == "submit"]
    ok = any(expected in s for s in said)
    return EvaluationResult(score=1.0 if ok else 0.0, reason="found" if ok else "missing", metrics={"said": len(said)})


def script(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Any:
    """The scripted policy: what it does depends on the user's request and the turn."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    last = messages[-1]
    plan: dict[str, list[Any]] = {
        "add": [{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}, "It is {tool}."],
        "divide-by-zero": [{"tool_calls": [{"name": "divide", "arguments": {"a": 1, "b": 0}}]}, "Cannot: {tool}"],
        "bad-args": [{"tool_calls": [{"name": "add", "arguments": {"a": "two", "b": 3}}]}, "Hm: {tool}"],
        "bad-json": [{"tool_calls": [{"name": "add", "arguments": "{oops"}]}, "Hm: {tool}"],
        "unknown-tool": [{"tool_calls": [{"name": "search", "arguments": {}}]}, "Hm: {tool}"],
        "submit": [{"tool_calls": [{"name": "submit", "arguments": {"answer": "5"}}]}, "never reached"],
        "loop": [{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}] * 10,
        "explode": [{"tool_calls": [{"name": "explode", "arguments": {}}]}, "never reached"],
        "plain": ["Just 5."],
    }[user]
    turn = sum(m["role"] == "assistant" for m in messages)
    reply = plan[turn]
    if isinstance(reply, str):
        return reply.format(tool=last.get("content"))
    return reply


@pytest.fixture(scope="module")
def model() -> Iterator[tuple[str, Any]]:
    app = scripted_model_app(script)
    with serve_app(app) as url:
        yield f"{url}/v1", app


@pytest.fixture(scope="module")
def env_url() -> Iterator[str]:
    agent = tool_agent([add, divide, explode, submit], evaluator=grade, max_turns=4, stop_tools={"submit"},
                       system_prompt="You are a calculator.")
    with serve_app(create_env_app(agent)) as url:
        yield url


async def run(env_url: str, model_url: str, user: str, rid: str, **extra: Any) -> StatusResponse:
    md = RolloutMetadata(invocation_id="i", experiment_id="e", rollout_id=rid, run_id="u", row_id="w")
    req = InitRequest(metadata=md, messages=[{"role": "user", "content": user}], model_base_url=model_url,
                      api_key="k", task_metadata={"expect": 5}, completion_params={"model": "policy", "max_tokens": 64},
                      **extra)
    async with EnvClient(env_url) as env:
        await env.init(req)
        return await env.wait(rid, deadline_s=10)


def roles(st: StatusResponse) -> list[str]:
    return [m.role for m in st.messages or []]


async def test_tool_call_then_answer(env_url: str, model: tuple[str, Any]) -> None:
    st = await run(env_url, model[0], "add", "t-add")
    assert st.status is not None and st.status.code == StatusCode.FINISHED
    assert st.reward == 1.0 and st.info == {"reason": "found"}
    assert roles(st) == ["system", "user", "assistant", "tool", "assistant"]
    msgs = st.messages or []
    assert msgs[3].content == "5" and msgs[3].tool_call_id == msgs[2].tool_calls[0].id  # type: ignore[index]
    assert msgs[4].content == "It is 5."
    assert st.termination_reason == "stop"
    assert st.metrics == {"turns": 2.0, "tool_calls": 1.0, "tool_errors": 0.0, "said": 2.0}
    sent = [r["body"] for r in model[1].state.requests if r["body"]["messages"][1]["content"] == "add"]
    assert [t["function"]["name"] for t in sent[0]["tools"]] == ["add", "divide", "explode", "submit"]
    assert sent[0]["max_tokens"] == 64 and sent[0]["messages"][0]["content"] == "You are a calculator."


@pytest.mark.parametrize(
    ("user", "fed_back"),
    [
        ("divide-by-zero", "error: division by zero"),
        ("bad-args", "error: invalid arguments for add: a: Input should be a valid integer"),
        ("unknown-tool", "error: unknown tool 'search'"),
        ("bad-json", "error: arguments of add must be a JSON object, got str"),  # '"{oops"' on the wire
    ],
)
async def test_tool_problems_are_fed_back_to_the_model(env_url: str, model: tuple[str, Any], user: str,
                                                       fed_back: str) -> None:
    st = await run(env_url, model[0], user, f"t-{user}")
    assert st.status is not None and st.status.code == StatusCode.FINISHED
    tool_msg = (st.messages or [])[3]
    assert tool_msg.role == "tool" and isinstance(tool_msg.content, str)
    assert tool_msg.content.startswith(fed_back)
    assert st.metrics is not None and st.metrics["tool_errors"] == 1.0
    assert (st.messages or [])[-1].content == f"Hm: {tool_msg.content}" or user == "divide-by-zero"


async def test_stop_tool_ends_the_episode_as_submitted(env_url: str, model: tuple[str, Any]) -> None:
    st = await run(env_url, model[0], "submit", "t-submit")
    assert st.termination_reason == "submitted" and st.reward == 1.0
    assert roles(st) == ["system", "user", "assistant", "tool"]


async def test_max_turns(env_url: str, model: tuple[str, Any]) -> None:
    st = await run(env_url, model[0], "loop", "t-loop")
    assert st.termination_reason == "max_turns" and st.reward == 0.0
    assert roles(st).count("assistant") == 4 and st.metrics is not None and st.metrics["turns"] == 4.0


async def test_a_bug_in_a_tool_fails_the_rollout(env_url: str, model: tuple[str, Any]) -> None:
    st = await run(env_url, model[0], "explode", "t-explode")
    assert st.status is not None and st.status.code == StatusCode.INTERNAL
    assert st.status.message == "RuntimeError: tool bug"


async def test_task_tools_are_advertised_instead_and_factory_tools_see_the_task(model: tuple[str, Any]) -> None:
    def tools_for(task: RolloutTask) -> list[Any]:
        offset = int(task.task_metadata["offset"])

        def add(a: int, b: int) -> int:
            """Add with this task's offset."""
            return a + b + offset

        return [add]

    async def no_score(task: RolloutTask, messages: list[dict[str, Any]]) -> None:
        return None

    agent = tool_agent(tools_for, evaluator=no_score)
    advertised = [{"type": "function", "function": {"name": "add", "description": "from the dataset",
                                                     "parameters": {"type": "object", "properties": {}}}}]
    with serve_app(create_env_app(agent)) as url:
        md = RolloutMetadata(invocation_id="i", experiment_id="e", rollout_id="f1", run_id="u", row_id="w")
        req = InitRequest(metadata=md, messages=[{"role": "user", "content": "add"}], model_base_url=model[0],
                          tools=advertised, task_metadata={"offset": 100})
        async with EnvClient(url) as env:
            await env.init(req)
            st = await env.wait("f1", deadline_s=10)
    assert (st.messages or [])[2].content == "105"
    assert st.reward is None and st.status is not None and st.status.code == StatusCode.FINISHED
    sent = [r["body"] for r in model[1].state.requests if r["body"].get("tools") == advertised]
    assert sent, "the task's own tools were not the ones advertised"


# --- function_tool_spec -----------------------------------------------------------------------


class Filter(BaseModel):
    field: str
    value: int


def query(table: Literal["users", "orders"], ids: list[int], limit: int = 10, where: Filter | None = None) -> str:
    """Query a table.

    Longer explanation that is part of the description.

    Args:
        table: which table
        ids: row ids to fetch,
            continued on a second line
        limit: most rows returned

    Returns:
        rows as text
    """
    return ""


def test_function_tool_spec_from_signature_and_docstring() -> None:
    spec = function_tool_spec(query)
    fn = spec["function"]
    assert spec["type"] == "function" and fn["name"] == "query"
    assert fn["description"] == "Query a table. Longer explanation that is part of the description."
    params = fn["parameters"]
    assert params["required"] == ["table", "ids"] and params["additionalProperties"] is False
    props = params["properties"]
    assert props["table"] == {"enum": ["users", "orders"], "type": "string", "description": "which table"}
    assert props["ids"] == {"items": {"type": "integer"}, "type": "array",
                            "description": "row ids to fetch, continued on a second line"}
    assert props["limit"]["default"] == 10 and props["limit"]["type"] == "integer"
    assert "Filter" in params["$defs"] and "title" not in props["limit"]


def test_function_tool_spec_without_docstring_or_parameters() -> None:
    def ping() -> str:
        return "pong"

    assert function_tool_spec(ping) == {
        "type": "function",
        "function": {"name": "ping", "parameters": {"additionalProperties": False, "properties": {}, "type": "object"}},
    }


def untyped(a, b: int) -> int:  # type: ignore[no-untyped-def]
    return b


def star(*args: int) -> int:
    return 0


@pytest.mark.parametrize(
    ("fn", "message"),
    [(untyped, "parameter 'a' has no type annotation"), (star, "*args"), (lambda x: x, "lambda")],
)
def test_function_tool_spec_rejects_what_cannot_be_described(fn: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message.replace("*", r"\*")):
        function_tool_spec(fn)


def test_tool_agent_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="stop_tools"):
        tool_agent([add], stop_tools={"finish"})
    with pytest.raises(ValueError, match="max_turns"):
        tool_agent([add], max_turns=0)
