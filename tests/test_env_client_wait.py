"""EnvClient.wait / wait_many against real servers: the SDK's (long-poll, batch) and a minimal
foreign one (no long-poll, no batch), plus the pooled connection set."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from env_sdk import (
    EnvClient,
    RolloutTask,
    StatusCode,
    WaitTimeoutError,
    create_env_app,
)
from tests.helpers import Recorder, serve_app
from tests.helpers import init_request as request


async def sleeper(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
    await asyncio.sleep(float(task.task_metadata.get("sleep", 0)))
    return 1.0


async def test_wait_many_collects_hundreds_with_few_requests() -> None:
    rec = Recorder(create_env_app(sleeper, max_concurrency=1000))
    rng = random.Random(0)
    ids = [f"r{i}" for i in range(300)]
    with serve_app(rec) as url:
        async with EnvClient(url, max_connections=8) as env:
            await asyncio.gather(*(env.init(request(rid, rng.uniform(0.0, 0.6))) for rid in ids))
            pending, done = set(ids), {}
            t0 = time.monotonic()
            while pending:
                got = await env.wait_many(sorted(pending), timeout_s=5)
                assert got, "a long-poll returned nothing although rollouts were finishing"
                done.update(got)
                pending -= set(got)
            elapsed = time.monotonic() - t0
    assert all(st.status is not None and st.status.code == StatusCode.FINISHED for st in done.values())
    assert len(done) == 300 and elapsed < 8.0
    assert rec.paths["/status/batch"] <= 100, rec.paths  # not one poll per rollout (300) per interval
    assert "/status" not in rec.paths
    assert len(rec.sockets) <= 8  # 300 inits through the pool, not a socket each


async def test_wait_many_times_out_empty_and_reports_unknown_ids() -> None:
    with serve_app(create_env_app(sleeper)) as url:
        async with EnvClient(url) as env:
            await env.init(request("slow", 20))
            t0 = time.monotonic()
            assert await env.wait_many(["slow"], timeout_s=0.3) == {}
            assert 0.25 < time.monotonic() - t0 < 4.0
            got = await env.wait_many(["slow", "ghost"], timeout_s=5)
    assert list(got) == ["ghost"]
    assert got["ghost"].terminated and got["ghost"].status is not None
    assert got["ghost"].status.code == StatusCode.NOT_FOUND


async def test_wait_long_polls_and_raises_at_its_deadline() -> None:
    rec = Recorder(create_env_app(sleeper))
    with serve_app(rec) as url:
        async with EnvClient(url) as env:
            await env.init(request("w", 0.4))
            st = await env.wait("w", deadline_s=10)
            await env.init(request("late", 20))
            with pytest.raises(WaitTimeoutError):
                await env.wait("late", deadline_s=0.3)
            with pytest.raises(TimeoutError):  # WaitTimeoutError is a TimeoutError too
                await env.wait("late", deadline_s=0.1)
    assert st.reward == 1.0
    assert rec.paths["/status"] <= 4  # long-polls, not a poll every 50 ms


def foreign_app(finish_after_s: float) -> FastAPI:
    """A minimal server as an eval-protocol-era env might be: /init and /status only, no long-poll."""
    app = FastAPI()
    started: dict[str, float] = {}

    @app.post("/init")
    async def init(body: dict[str, Any]) -> JSONResponse:
        started[body["metadata"]["rollout_id"]] = time.monotonic()
        return JSONResponse({}, status_code=200)

    @app.get("/status")
    async def status(rollout_id: str) -> JSONResponse:
        if rollout_id not in started:
            return JSONResponse({"detail": "unknown"}, status_code=404)
        done = time.monotonic() - started[rollout_id] > finish_after_s
        return JSONResponse({"terminated": done, "status": {"code": 100 if done else 101, "message": ""}, "info": {}})

    return app


async def test_a_server_without_batch_or_long_poll_still_works() -> None:
    rec = Recorder(foreign_app(0.3))
    with serve_app(rec) as url:
        async with EnvClient(url) as env:
            assert (await env.init(request("f1"))).rollout_id == "f1"
            await env.init(request("f2"))
            st = await env.wait("f1", deadline_s=5)
            got: dict[str, Any] = {}
            while "f2" not in got:
                got.update(await env.wait_many(["f2", "nobody"], timeout_s=5))
    assert st.terminated and st.status is not None and st.status.code == 100
    assert got["nobody"].status.code == StatusCode.NOT_FOUND
    assert rec.paths["/status/batch"] == 1  # tried once, then per-id polling
    assert rec.paths["/status"] < 40  # with backoff, not a hot loop


async def test_concurrent_waiters_ask_a_server_without_batch_once() -> None:
    """Two waiters start before the server's first 404 arrives: one probe, not one per waiter
    (a two-endpoint env in training saw two POST /status/batch from two env waiters' polls)."""
    rec = Recorder(foreign_app(0.2))
    with serve_app(rec) as url:
        async with EnvClient(url) as env:
            ids = [f"c{i}" for i in range(6)]
            for rid in ids:
                await env.init(request(rid))
            answers = await asyncio.gather(*(env.wait_many([rid], timeout_s=5) for rid in ids))
    assert all(a[rid].terminated for a, rid in zip(answers, ids))
    assert rec.paths["/status/batch"] == 1
