"""The env server runs rollouts for real: uvicorn on loopback, a scripted OpenAI-compatible model
server standing in for the trainer's gateway, the SDK client on the other side."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from env_sdk import (
    AgentResult,
    EnvClient,
    InitRequest,
    RolloutMetadata,
    RolloutTask,
    StatusCode,
    create_env_app,
)
from tests.helpers import scripted_model_app, serve_app


def request(rid: str, model_url: str | None = None, **extra: Any) -> InitRequest:
    md = RolloutMetadata(invocation_id="inv", experiment_id="exp", rollout_id=rid, run_id="run", row_id="row-1")
    return InitRequest(metadata=md, messages=[{"role": "user", "content": "What is 2+3?"}],
                       model_base_url=model_url, api_key=f"key-{rid}", **extra)


async def arithmetic_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    """A typical small env: ask the policy once, check its answer."""
    messages = list(task.messages)
    reply = await client.chat.completions.create(messages=messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    messages.append({"role": "assistant", "content": text})
    correct = task.task_metadata.get("expect", "") in text
    return AgentResult(
        reward=1.0 if correct else 0.0,
        messages=messages,
        info={"answer": text},
        metrics={"chars": float(len(text))},
        termination_reason="stop",
    )


async def test_agent_calls_the_model_through_the_injected_client() -> None:
    model = scripted_model_app(lambda messages, tools: f"I think it is {2 + 3}.")
    app = create_env_app(arithmetic_agent)
    with serve_app(model) as model_url, serve_app(app) as url:
        gateway = f"{model_url}/v1/rollout_id/r1/invocation_id/inv/experiment_id/exp/run_id/run/row_id/row-1"
        async with EnvClient(url) as env:
            req = request("r1", gateway, completion_params={"model": "policy", "temperature": 0.7, "top_k": 5},
                          task_metadata={"expect": "5"})
            assert (await env.init(req)).rollout_id == "r1"
            st = await env.wait("r1", deadline_s=10)
            wrong = request("r2", gateway, task_metadata={"expect": "7"})
            await env.init(wrong)
            st2 = await env.wait("r2", deadline_s=10)

    assert st.terminated and st.status is not None and st.status.code == StatusCode.FINISHED
    assert st.reward == 1.0 and st2.reward == 0.0
    assert st.info == {"answer": "I think it is 5."}
    assert st.metrics == {"chars": 16.0} and st.termination_reason == "stop"
    assert [m.role for m in st.messages or []] == ["user", "assistant"]
    call = model.state.requests[0]
    # The call went to the rollout's own URL with the rollout's key; unknown params in extra_body.
    assert call["path"] == "v1/rollout_id/r1/invocation_id/inv/experiment_id/exp/run_id/run/row_id/row-1/chat/completions"
    assert call["auth"] == "Bearer key-r1"
    assert call["body"]["temperature"] == 0.7 and call["body"]["top_k"] == 5
    assert call["body"]["model"] == "policy"


async def test_rollouts_share_one_pooled_http_client() -> None:
    seen: list[Any] = []

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        seen.append(client._client)  # the httpx client the OpenAI client sends through
        return 1.0

    app = create_env_app(agent)
    with serve_app(app) as url:
        async with EnvClient(url) as env:
            for i in range(5):
                await env.init(request(f"p{i}", "http://127.0.0.1:9/v1"))
            await asyncio.gather(*(env.wait(f"p{i}", deadline_s=5) for i in range(5)))
    assert len(seen) == 5 and all(c is seen[0] for c in seen)
    assert isinstance(seen[0], httpx.AsyncClient)


@pytest.mark.parametrize(
    ("returned", "code", "reward"),
    [
        (None, StatusCode.FINISHED, None),
        (0.25, StatusCode.FINISHED, 0.25),
        (1, StatusCode.FINISHED, 1.0),
        (1.5, StatusCode.SCORE_INVALID, None),
        (-0.1, StatusCode.SCORE_INVALID, None),
        (math.nan, StatusCode.SCORE_INVALID, None),
        (AgentResult(reward=math.inf), StatusCode.SCORE_INVALID, None),
        ("yes", StatusCode.INTERNAL, None),
    ],
)
async def test_what_the_agent_returns_becomes_the_status(returned: Any, code: StatusCode, reward: float | None) -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> Any:
        return returned

    with serve_app(create_env_app(agent)) as url:
        async with EnvClient(url) as env:
            await env.init(request("x"))
            st = await env.wait("x", deadline_s=5)
    assert st.terminated and st.status is not None
    assert st.status.code == code, st.status.message
    assert st.reward == reward
    if code == StatusCode.SCORE_INVALID:
        assert "reward" in st.status.message


async def test_crash_in_agent_is_a_terminal_error_and_the_server_keeps_serving() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        if task.metadata.rollout_id == "bad":
            raise KeyError("no such column 'price'")
        if task.metadata.rollout_id == "exits":
            sys.exit(3)
        return 1.0

    with serve_app(create_env_app(agent)) as url:
        async with EnvClient(url) as env:
            await env.init(request("bad"))
            st = await env.wait("bad", deadline_s=5)
            await env.init(request("exits"))
            exited = await env.wait("exits", deadline_s=5)
            await env.init(request("good"))
            ok = await env.wait("good", deadline_s=5)
            health = await env.health()
    assert st.status is not None and st.status.code == StatusCode.INTERNAL
    assert st.status.message == "KeyError: \"no such column 'price'\""
    assert exited.status is not None and exited.status.code == StatusCode.INTERNAL
    assert exited.status.message == "SystemExit: 3"
    assert ok.reward == 1.0 and health.in_flight == 0


async def test_deadline_cancels_the_agent() -> None:
    cancelled = threading.Event()

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1.0

    with serve_app(create_env_app(agent, deadline_s=30)) as url:
        async with EnvClient(url) as env:
            t0 = time.monotonic()
            await env.init(request("slow", deadline_s=0.3))  # the request's deadline wins
            st = await env.wait("slow", deadline_s=5)
            elapsed = time.monotonic() - t0
    assert st.status is not None and st.status.code == StatusCode.DEADLINE_EXCEEDED
    assert "0.3s" in st.status.message
    assert cancelled.is_set() and 0.25 < elapsed < 5.0


async def test_agent_raising_its_own_timeout_is_a_crash_not_a_deadline() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        raise TimeoutError("tool sandbox timed out")

    with serve_app(create_env_app(agent)) as url:
        async with EnvClient(url) as env:
            await env.init(request("t"))
            st = await env.wait("t", deadline_s=5)
    assert st.status is not None and st.status.code == StatusCode.INTERNAL
    assert "tool sandbox timed out" in st.status.message


async def test_cancel_stops_a_running_rollout() -> None:
    cancelled = threading.Event()

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1.0

    with serve_app(create_env_app(agent)) as url:
        async with EnvClient(url) as env:
            await env.init(request("c"))
            await env.cancel("c")
            st = await env.status("c")  # terminal right after /cancel answers
            async with httpx.AsyncClient(base_url=url) as raw:
                again = await raw.post("/cancel", params={"rollout_id": "c"})
                unknown = await raw.post("/cancel", params={"rollout_id": "nope"})
            health = await env.health()
    assert st.terminated and st.status is not None and st.status.code == StatusCode.CANCELLED
    assert cancelled.is_set()
    assert again.status_code == 200 and again.json() == {"rollout_id": "c", "cancelled": False}
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    assert health.in_flight == 0


async def test_capacity_limit_answers_429_with_retry_after() -> None:
    release = threading.Event()  # set from the test's thread, the server runs in its own

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return 1.0

    with serve_app(create_env_app(agent, max_concurrency=2)) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            codes = [(await raw.post("/init", content=request(f"k{i}").model_dump_json())).status_code for i in range(2)]
            full = await raw.post("/init", content=request("k2").model_dump_json())
            # a duplicate of a running rollout is not a new rollout: accepted even at capacity
            dup = await raw.post("/init", content=request("k0").model_dump_json())
            health = (await raw.get("/health")).json()
            release.set()
            async with EnvClient(url) as env:
                await env.wait_many(["k0", "k1"], timeout_s=5)
                done = (await raw.get("/health")).json()
                after = await raw.post("/init", content=request("k2").model_dump_json())
    assert codes == [202, 202]
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert "capacity" in full.json()["detail"]
    assert dup.status_code == 200
    assert health == {"status": "ok", "protocol_version": "1", "capacity": 2, "in_flight": 2, "available": 0}
    assert done["available"] == 2 and after.status_code == 202


async def test_init_is_idempotent_on_rollout_id() -> None:
    calls: list[str] = []

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        calls.append(task.metadata.rollout_id)
        return 0.5

    with serve_app(create_env_app(agent)) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            body = request("same").model_dump_json()
            first = await raw.post("/init", content=body)
            second = await raw.post("/init", content=body)
            async with EnvClient(url) as env:
                await env.wait("same", deadline_s=5)
            third = await raw.post("/init", content=body)  # after it finished: still the same rollout
    assert first.status_code == 202 and second.status_code == 200 and third.status_code == 200
    assert first.json() == second.json() == {"status": "accepted", "rollout_id": "same"}
    assert calls == ["same"]


async def test_finished_results_expire_after_ttl() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        return 1.0

    with serve_app(create_env_app(agent, result_ttl_s=1.0)) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            await raw.post("/init", content=request("e").model_dump_json())
            kept = await raw.get("/status", params={"rollout_id": "e", "wait_s": 5})
            await asyncio.sleep(1.5)
            gone = await raw.get("/status", params={"rollout_id": "e"})
    assert kept.status_code == 200 and kept.json()["terminated"] is True
    assert gone.status_code == 404


async def test_rollouts_are_logged_with_their_id(caplog: pytest.LogCaptureFixture) -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        raise RuntimeError("boom")

    caplog.set_level("INFO", logger="env_sdk.server")
    with serve_app(create_env_app(agent)) as url:
        async with EnvClient(url) as env:
            await env.init(request("logged-1"))
            await env.wait("logged-1", deadline_s=5)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "rollout logged-1 started" in text
    assert "rollout logged-1: agent raised RuntimeError: boom" in text
    assert "rollout logged-1 finished: code=13" in text


#: eval-protocol 0.3.33 sends `InitRequest.model_dump()`: every optional Message field, as null.
EP_MESSAGE_NULLS = {"reasoning_content": None, "name": None, "tool_call_id": None, "tool_calls": None,
                    "function_call": None, "control_plane_step": None, "weight": None, "logprobs": None}


async def test_eval_protocol_init_body_is_accepted_as_is() -> None:
    """A literal body as eval-protocol 0.3.33's RemoteRolloutProcessor posts it (model_dump(), nulls kept)."""
    seen: list[RolloutTask] = []

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> None:
        seen.append(task)

    body = {
        "completion_params": {"model": "fireworks_ai/accounts/fireworks/models/qwen3-8b", "temperature": 0.0,
                              "max_tokens": 512},
        "messages": [dict(EP_MESSAGE_NULLS, role="system", content="You are terse."),
                     dict(EP_MESSAGE_NULLS, role="user", content="hi")],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "d",
                                                     "parameters": {"type": "object", "properties": {}}}}],
        "model_base_url": "https://tracing.fireworks.ai/rollout_id/ep-1/invocation_id/iv/experiment_id/ex/run_id/rn/row_id/rw",
        "metadata": {"invocation_id": "iv", "experiment_id": "ex", "rollout_id": "ep-1", "run_id": "rn",
                     "row_id": "rw"},
        "api_key": "fw-key",
    }
    with serve_app(create_env_app(agent)) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            resp = await raw.post("/init", json=body)
            async with EnvClient(url) as env:
                st = await env.wait("ep-1", deadline_s=5)
    assert resp.status_code == 202 and resp.json()["rollout_id"] == "ep-1"
    assert st.status is not None and st.status.code == StatusCode.FINISHED and st.reward is None
    task = seen[0]
    assert task.model == "fireworks_ai/accounts/fireworks/models/qwen3-8b"
    assert task.tools == body["tools"] and task.task_metadata == {}
    assert [m["role"] for m in task.messages] == ["system", "user"]


async def test_version_and_protocol_header() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> None:
        return None

    with serve_app(create_env_app(agent, name="arith")) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            version = await raw.get("/version")
            missing = await raw.get("/status", params={"rollout_id": "none"})
    assert version.json()["protocol_version"] == "1" and version.json()["name"] == "arith"
    assert version.headers["x-openrft-protocol"] == "1"
    assert missing.status_code == 404 and missing.headers["x-openrft-protocol"] == "1"
