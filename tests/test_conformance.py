"""`openrft conformance` against real servers on loopback (uvicorn): the SDK's own (every level
passes), an env written eval-protocol's way (plain FastAPI, only `POST /init` + `GET /status`: core
passes, v1 extensions absent, exit 0 unless --strict or the server claims v1), and broken ones
(a failing core check, or a v1 extension that answers but is wrong: exit 1, naming the check)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from env_sdk import AgentResult, RolloutTask, create_env_app, tool_agent
from env_sdk.conformance import (
    ABSENT,
    CORE,
    FAIL,
    PASS,
    SKIP,
    V1,
    CheckResult,
    main,
    run_conformance,
    trainer_verdict,
)
from tests.helpers import serve_app

ROOT = Path(__file__).resolve().parents[1]
V1_EXTENSIONS = ["health (capacity)", "version discovery", "cancel", "batched status"]


async def greeter(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    return AgentResult(reward=1.0 if "Hello" in text else 0.0, termination_reason="stop",
                       messages=[*task.messages, {"role": "assistant", "content": text}])


def outcomes(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.status for r in results}


def details(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.detail for r in results}


def conformance_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.cli", "conformance", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}, check=False)


# --- an env server written eval-protocol's way -------------------------------------------------


class EPMetadata(BaseModel):
    invocation_id: str
    experiment_id: str
    rollout_id: str
    run_id: str
    row_id: str


class EPInitRequest(BaseModel):
    """eval-protocol's InitRequest, as their env servers declare the /init body."""

    completion_params: dict[str, Any] = {}
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    model_base_url: str | None = None
    metadata: EPMetadata
    api_key: str | None = None


def ep_style_app(*, init_fails: bool = False) -> FastAPI:
    """Only `POST /init` and `GET /status`, plain FastAPI, no X-OpenRFT-Protocol header. Idempotent on
    the rollout id; a terminal status carries a reward, as openrft's trainer can use it."""
    app = FastAPI()
    statuses: dict[str, dict[str, Any]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def rollout(req: EPInitRequest) -> None:
        client = openai.AsyncOpenAI(base_url=req.model_base_url, api_key=req.api_key, max_retries=0)
        reply = await client.chat.completions.create(model=req.completion_params["model"], messages=req.messages or [])
        text = reply.choices[0].message.content or ""
        statuses[req.metadata.rollout_id] = {"terminated": True, "status": {"code": 100, "message": "Rollout finished"},
                                             "info": {"answer": text}, "reward": 1.0 if "Hello" in text else 0.0}

    @app.post("/init")
    async def init(req: EPInitRequest) -> Response:
        if init_fails:
            return JSONResponse({"detail": "internal error"}, status_code=500)
        rid = req.metadata.rollout_id
        if rid not in statuses:
            statuses[rid] = {"terminated": False, "status": {"code": 101, "message": "running"}, "info": {}}
            task = asyncio.create_task(rollout(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return JSONResponse({"status": "started"})

    @app.get("/status")
    async def status(rollout_id: str) -> dict[str, Any]:
        if rollout_id not in statuses:
            raise HTTPException(404, f"unknown rollout {rollout_id}")
        return statuses[rollout_id]

    return app


def claiming_v1(app: FastAPI) -> FastAPI:
    """`app` with the X-OpenRFT-Protocol header on every answer, as openrft's env servers send it."""

    @app.middleware("http")
    async def header(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-OpenRFT-Protocol"] = "1"
        return response

    return app


# --- exit codes, through the CLI as a user runs it ------------------------------------------------


@pytest.mark.parametrize(("make_app", "args", "rc"), [
    pytest.param(ep_style_app, [], 0, id="eval-protocol-style"),
    pytest.param(lambda: ep_style_app(init_fails=True), [], 1, id="init-answers-500"),
    pytest.param(ep_style_app, ["--strict"], 1, id="eval-protocol-style-strict"),
    pytest.param(lambda: create_env_app(greeter, token="tok"), ["--token", "tok"], 0, id="create_env_app"),
])
def test_cli_exit_status(make_app: Callable[[], FastAPI], args: list[str], rc: int) -> None:
    with serve_app(make_app()) as url:
        done = conformance_cli(url, *args)
    assert done.returncode == rc, done.stdout + done.stderr
    assert "level" in done.stdout and "verdict" in done.stdout


def test_sdk_server_passes_every_check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with serve_app(create_env_app(greeter, token="tok")) as url:
        rc = main([url, "--token", "tok"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("PASS") == 12 and "FAIL" not in out and "ABSENT" not in out
    assert "reward 1.0, 1 model call(s)" in out  # the env really called the stub model
    assert "can train against this server: every core check passes." in out
    rows = [line for line in out.splitlines() if "PASS" in line]
    assert sum(" core " in row for row in rows) == 6 and sum(" v1 " in row for row in rows) == 6


def test_tool_agent_server_passes_without_token() -> None:
    def echo(text: str) -> str:
        """Echo text back."""
        return text

    with serve_app(create_env_app(tool_agent([echo]))) as url:
        results = asyncio.run(run_conformance(url))
    got = outcomes(results)
    assert got.pop("bearer token -> 401") == SKIP
    assert set(got.values()) == {PASS}, results


# --- levels against an eval-protocol-style server -------------------------------------------------


def test_eval_protocol_style_server_passes_core_with_extensions_absent(capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with serve_app(ep_style_app()) as url:
        rc = main([url])
        strict = asyncio.run(run_conformance(url, strict=True))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert {r.status for r in strict if r.level == CORE} == {PASS}, strict
    assert "reward 1.0, 1 model call(s)" in out
    assert out.count("ABSENT") == len(V1_EXTENSIONS) + 1  # the rows, and the line that explains them
    assert "the server does not claim v1" in out and "--strict" in out
    assert "can train against this server: every core check passes; it polls GET /status per rollout" in out

    got, why = outcomes(strict), details(strict)
    assert [r.name for r in strict if r.fails] == V1_EXTENSIONS
    for name in V1_EXTENSIONS:
        assert got[name] == ABSENT and why[name].endswith("HTTP 404; required by --strict"), (name, why[name])
    assert got["bearer token -> 401"] == SKIP and got["batched init (optional)"] == SKIP


def test_absent_extensions_fail_a_server_that_claims_v1(capsys: pytest.CaptureFixture[str]) -> None:
    with serve_app(claiming_v1(ep_style_app())) as url:
        rc = main([url])
        results = asyncio.run(run_conformance(url))
    assert rc == 1
    assert {r.status for r in results if r.level == CORE} == {PASS}
    got, why = outcomes(results), details(results)
    assert [r.name for r in results if r.fails] == V1_EXTENSIONS
    for name in V1_EXTENSIONS:
        assert got[name] == ABSENT and "required of a v1 server (it sends X-OpenRFT-Protocol: 1)" in why[name]
    assert "4 check(s) failed" in capsys.readouterr().err
    polls = "every core check passes; it polls GET /status per rollout (no /status/batch)"
    assert trainer_verdict(results) == (True, polls)


def test_present_but_broken_extensions_fail_a_foreign_server(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A /health of the app's own (eval-protocol's servers have one) is not openrft's: absent. A /cancel
    or /status/batch that answers 500 is there and broken: failed, without any v1 claim."""
    monkeypatch.setenv("COLUMNS", "200")
    app = ep_style_app()
    app.get("/health")(lambda: {"status": "ok"})
    app.post("/cancel")(lambda rollout_id: JSONResponse({"detail": "boom"}, status_code=500))
    with serve_app(app) as url:
        rc = main([url])
        cancel_only = asyncio.run(run_conformance(url))
        app.post("/status/batch")(lambda: JSONResponse({"detail": "boom"}, status_code=500))
        batch_too = asyncio.run(run_conformance(url))
    out = capsys.readouterr().out
    assert rc == 1
    got, why = outcomes(cancel_only), details(cancel_only)
    assert got["health (capacity)"] == ABSENT
    assert "answers 200 with a body of its own, not openrft's Health" in why["health (capacity)"]
    assert got["cancel"] == FAIL and "POST /cancel: HTTP 500, expected 200" in why["cancel"]
    assert got["batched status"] == ABSENT
    assert "can train against this server" in out  # it never needs /cancel to answer

    assert outcomes(batch_too)["batched status"] == FAIL
    assert trainer_verdict(batch_too) == (False, "it would use these and they are broken: batched status")


# --- broken servers --------------------------------------------------------------------------------


def broken_app() -> FastAPI:
    """Looks like an env server, but: 200 for unknown ids, 500 on a bad body, no auth, no batch."""
    app = FastAPI()
    seen: set[str] = set()

    @app.post("/init")
    async def init(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            rid = body["metadata"]["rollout_id"]
        except (ValueError, KeyError, TypeError):
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
    assert got["cancel"] == FAIL  # there, but 200 for an unknown id
    assert got["batched status"] == ABSENT and got["version discovery"] == ABSENT  # no v1 claim: allowed
    assert got["health (capacity)"] == PASS and got["init accepted fast"] == PASS
    assert got["batched init (optional)"] == SKIP  # not advertised: not sent
    assert {r.level for r in results if r.name in ("unknown id -> 404", "bad body -> 4xx + message")} == {CORE}
    assert {r.level for r in results if r.name in ("cancel", "batched status")} == {V1}
    why = details(results)
    assert "HTTP 200, expected 404" in why["unknown id -> 404"]
    assert "malformed JSON: HTTP 500" in why["bad body -> 4xx + message"]
    assert "failed:" in captured.err and "unknown id -> 404" in captured.err
    assert "bearer token -> 401" in captured.err  # with --token, a server that ignores it fails
    assert "cannot train against this server: core check(s) failed: unknown id -> 404, bad body" in captured.out


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
    failed = {r.name: r.detail for r in results if r.fails}
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
