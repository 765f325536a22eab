"""`openrft conformance` passes against the SDK's own server and fails, naming the check, against
a deliberately broken one. Both servers are real (uvicorn on loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from env_sdk import AgentResult, RolloutTask, create_env_app, tool_agent
from env_sdk.conformance import FAIL, PASS, SKIP, main, run_conformance
from tests.helpers import serve_app


async def greeter(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    return AgentResult(reward=1.0 if "Hello" in text else 0.0, termination_reason="stop",
                       messages=[*task.messages, {"role": "assistant", "content": text}])


def outcomes(results: list[Any]) -> dict[str, str]:
    return {r.name: r.outcome for r in results}


def test_sdk_server_passes_every_check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with serve_app(create_env_app(greeter, token="tok")) as url:
        rc = main([url, "--token", "tok"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count(PASS) == 12 and FAIL not in out
    assert "reward 1.0, 1 model call(s)" in out  # the env really called the stub model


def test_tool_agent_server_passes_without_token() -> None:
    def echo(text: str) -> str:
        """Echo text back."""
        return text

    with serve_app(create_env_app(tool_agent([echo]))) as url:
        results = asyncio.run(run_conformance(url))
    got = outcomes(results)
    assert got.pop("bearer token -> 401") == SKIP
    assert set(got.values()) == {PASS}, results


def broken_app() -> FastAPI:
    """Looks like an env server, but: 200 for unknown ids, 500 on a bad body, no auth, no batch."""
    app = FastAPI()
    seen: set[str] = set()

    @app.post("/init")
    async def init(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            rid = body["metadata"]["rollout_id"]
        except Exception:
            return JSONResponse({"error": "internal"}, status_code=500)
        seen.add(rid)
        return JSONResponse({"status": "accepted", "rollout_id": rid}, status_code=202)

    @app.get("/status")
    async def status(rollout_id: str = "") -> JSONResponse:
        return JSONResponse({"terminated": True, "status": {"code": 100, "message": "done"}, "info": {}})

    @app.post("/cancel")
    async def cancel(rollout_id: str) -> JSONResponse:
        return JSONResponse({"rollout_id": rollout_id, "cancelled": False})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "protocol_version": "1", "capacity": 4, "in_flight": 0, "available": 4}

    return app


def test_broken_server_fails_naming_the_checks(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with serve_app(broken_app()) as url:
        rc = main([url, "--token", "tok"])
        results = asyncio.run(run_conformance(url))
    captured = capsys.readouterr()
    assert rc == 1
    got = outcomes(results)
    assert got["unknown id -> 404"] == FAIL
    assert got["bad body -> 4xx + message"] == FAIL
    assert got["batched status"] == FAIL
    assert got["version discovery"] == FAIL
    assert got["health (capacity)"] == PASS and got["init accepted fast"] == PASS
    assert got["batched init (optional)"] == SKIP  # not advertised: not sent
    details = {r.name: r.detail for r in results}
    assert "HTTP 200, expected 404" in details["unknown id -> 404"]
    assert "malformed JSON: HTTP 500" in details["bad body -> 4xx + message"]
    assert "failed:" in captured.err and "unknown id -> 404" in captured.err
    assert "bearer token -> 401" in captured.err  # with --token, a server that ignores it fails


def test_task_file_is_sent_to_the_env(tmp_path: Any) -> None:
    """An env that needs a real task gets it from --task."""
    seen: list[dict[str, Any]] = []

    async def picky(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        seen.append(task.task_metadata)
        if "table" not in task.task_metadata:
            raise ValueError("task_metadata.table is required")
        return 1.0

    task_file = tmp_path / "task.json"
    task_file.write_text('{"task_metadata": {"table": "users"}, "messages": [{"role": "user", "content": "count"}]}')
    with serve_app(create_env_app(picky)) as url:
        assert main([url, "--task", str(task_file)]) == 0
        results = asyncio.run(run_conformance(url))  # without the task, the rollouts crash
    assert {"table": "users"} in seen
    failed = {r.name: r.detail for r in results if r.outcome == FAIL}
    assert list(failed) == ["terminal state reached"]
    assert "code 13 'ValueError: task_metadata.table is required'" in failed["terminal state reached"]
    assert "--task" in failed["terminal state reached"]


@pytest.mark.parametrize(("content", "message"), [("{oops", "Expecting"), ("[1]", "must hold a JSON object")])
def test_bad_task_file_is_explained(tmp_path: Any, capsys: pytest.CaptureFixture[str], content: str,
                                    message: str) -> None:
    task_file = tmp_path / "task.json"
    task_file.write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["http://127.0.0.1:9", "--task", str(task_file)])
    assert info.value.code == 2 and message in capsys.readouterr().err
