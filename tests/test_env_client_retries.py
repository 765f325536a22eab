"""EnvClient retries what the spec calls retryable and raises the error hierarchy for the rest.
Real servers on loopback provoke every path except one (noted where respx stands in)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
import respx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from env_sdk import (
    AuthError,
    BadRequestError,
    CapacityError,
    EnvClient,
    EnvError,
    EnvProtocolError,
    EnvUnreachableError,
    InitRequest,
    NotFoundError,
    RolloutMetadata,
    RolloutTask,
    ServerError,
    create_env_app,
)
from tests.helpers import free_port, serve_app

HEALTHY = {"status": "ok", "protocol_version": "1", "capacity": 1, "in_flight": 0, "available": 1}


def flaky_app(failures: list[tuple[int, dict[str, str]]]) -> FastAPI:
    """Answers each request with the next (status, headers) of `failures`, then succeeds."""
    app = FastAPI()
    app.state.calls = 0

    @app.get("/version")  # the client's one capability probe: answered, not counted, no failure spent
    async def version() -> JSONResponse:
        return JSONResponse({"protocol_version": "1", "name": "flaky"})

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def any_route(path: str, request: Request) -> JSONResponse:
        app.state.calls += 1
        if failures:
            code, headers = failures.pop(0)
            return JSONResponse({"detail": f"failure {code}"}, status_code=code, headers=headers)
        if path == "init":
            return JSONResponse({"status": "accepted", "rollout_id": "r"}, status_code=202)
        if path == "status":
            if request.query_params.get("rollout_id") == "bad-shape":
                return JSONResponse({"terminated": "maybe", "status": {"code": 100}})
            return JSONResponse({"terminated": True, "status": {"code": 100, "message": "", "details": []}})
        return JSONResponse(HEALTHY)

    return app


def request(rid: str = "r") -> InitRequest:
    md = RolloutMetadata(invocation_id="i", experiment_id="e", rollout_id=rid, run_id="u", row_id="w")
    return InitRequest(metadata=md)


async def test_503_and_429_are_retried_honouring_retry_after() -> None:
    app = flaky_app([(503, {"Retry-After": "0.3"}), (429, {"Retry-After": "0.3"}), (502, {})])
    with serve_app(app) as url:
        async with EnvClient(url, max_retries=3) as env:
            t0 = time.monotonic()
            health = await env.health()
            elapsed = time.monotonic() - t0
    assert health.status == "ok" and app.state.calls == 4
    assert elapsed >= 0.6  # both Retry-After waits were honoured


async def test_5xx_beyond_the_retries_is_a_server_error() -> None:
    app = flaky_app([(500, {})] * 5)
    with serve_app(app) as url:
        async with EnvClient(url, max_retries=2) as env:
            with pytest.raises(ServerError) as info:
                await env.status("r")
    assert app.state.calls == 3 and info.value.status_code == 500 and "failure 500" in info.value.body


async def test_capacity_from_a_real_sdk_server_is_a_capacity_error() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        await asyncio.sleep(10)
        return 1.0

    with serve_app(create_env_app(agent, max_concurrency=1)) as url:
        async with EnvClient(url, max_retries=0) as env:
            await env.init(request("one"))
            with pytest.raises(CapacityError) as info:
                await env.init(request("two"))
    assert info.value.status_code == 429 and "capacity" in str(info.value)


@pytest.mark.parametrize(("code", "error"), [(400, BadRequestError), (422, BadRequestError), (409, BadRequestError),
                                             (403, AuthError), (404, NotFoundError)])
async def test_4xx_is_never_retried(code: int, error: type[EnvError]) -> None:
    app = flaky_app([(code, {})] * 3)
    with serve_app(app) as url:
        async with EnvClient(url, max_retries=3) as env:
            with pytest.raises(error) as info:
                await env.init(request())
    assert app.state.calls == 1
    assert isinstance(info.value, EnvError) and f"HTTP {code}" in str(info.value)


async def test_real_server_errors_map_to_the_hierarchy() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        return 1.0

    with serve_app(create_env_app(agent, token="s3cret")) as url:
        async with EnvClient(url) as anonymous, EnvClient(url, token="s3cret") as env:
            with pytest.raises(AuthError) as auth:
                await anonymous.init(request())
            with pytest.raises(NotFoundError) as missing:
                await env.status("never-started")
            with pytest.raises(NotFoundError):
                await env.cancel("never-started")
    assert auth.value.status_code == 401 and "bearer token" in auth.value.body
    assert "never-started" in missing.value.body


async def test_connection_refused_after_retries_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with EnvClient(url, max_retries=2) as env:
        t0 = time.monotonic()
        with pytest.raises(EnvUnreachableError) as info:
            await env.health()
        elapsed = time.monotonic() - t0
    assert "ConnectError" in str(info.value) and "after 3 attempts" in str(info.value)
    assert elapsed > 0.1  # it backed off between attempts


async def test_a_hanging_server_times_out_and_is_unreachable() -> None:
    app = FastAPI()

    @app.get("/health")
    async def hang() -> dict[str, Any]:
        await asyncio.sleep(1.0)  # past the client's timeout; short so the server stops quickly
        return HEALTHY

    with serve_app(app) as url:
        async with EnvClient(url, timeout=0.2, max_retries=1) as env:
            with pytest.raises(EnvUnreachableError, match="ReadTimeout"):
                await env.health()


async def test_an_answer_off_the_spec_is_a_protocol_error() -> None:
    with serve_app(flaky_app([])) as url:
        async with EnvClient(url) as env:
            with pytest.raises(EnvProtocolError, match="terminated"):
                await env.status("bad-shape")


async def test_transient_connect_error_then_success() -> None:
    """respx: a real server cannot refuse one connection and accept the next on demand."""
    with respx.mock(base_url="http://env.test") as mock:
        route = mock.get("/health").mock(side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json=HEALTHY)])
        async with EnvClient("http://env.test", max_retries=2) as env:
            health = await env.health()
    assert health.capacity == 1 and route.call_count == 2
