"""POST /init/batch (optional, capability `init_batch`): each item ends as its own POST /init would,
and EnvClient sends the inits of rollouts started together as one request, only to servers that
advertise it. Real servers on loopback; a counting ASGI wrapper shows which requests travelled."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from env_sdk import (
    AuthError,
    CapacityError,
    EnvClient,
    InitResponse,
    RolloutTask,
    Task,
    create_env_app,
)
from env_sdk.client import INIT_BATCH_TIMEOUT_S
from tests.helpers import Recorder, serve_app
from tests.helpers import init_request as request
from trainer.config import EnvEndpoint
from trainer.rollouts import EnvPool, ExternalEndpoint, RolloutScheduler


class Sleeper:
    """An agent that sleeps task_metadata["sleep"] seconds and counts the rollouts it ran."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()

    async def __call__(self, task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        self.ran[task.metadata.rollout_id] += 1
        await asyncio.sleep(float(task.task_metadata.get("sleep", 0)))
        return 1.0


def md(rid: str) -> dict[str, str]:
    return {"invocation_id": "i", "experiment_id": "e", "rollout_id": rid, "run_id": "u", "row_id": "w"}


async def test_items_get_what_their_own_init_would_answer() -> None:
    """Started, repeated (also within the batch), invalid (same field errors as /init), at capacity."""
    agent = Sleeper()
    bad = [{"metadata": md("b1"), "deadline_s": "5"}, {"messages": "hello"}, 7]
    with serve_app(create_env_app(agent, max_concurrency=2)) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            version = (await raw.get("/version")).json()
            items = [{"metadata": md("a"), "task_metadata": {"sleep": 5}}, {"metadata": md("a")}, *bad,
                     {"metadata": md("c"), "task_metadata": {"sleep": 5}}, {"metadata": md("d")}]
            resp = await raw.post("/init/batch", json={"requests": items})
            alone = [await raw.post("/init", json=item) for item in bad]
            again = await raw.post("/init/batch", json={"requests": [{"metadata": md("c")}]})
    assert version["capabilities"] == ["init_batch"]
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [r["status_code"] for r in results] == [202, 200, 422, 422, 422, 202, 429]
    assert [r["rollout_id"] for r in results] == ["a", "a", "b1", None, None, "c", "d"]
    for item, single in zip(results[2:5], alone):
        assert single.status_code == item["status_code"] == 422
        assert single.json() == {"detail": item["detail"], "errors": item["errors"]}
    assert results[6]["detail"].startswith("at capacity: 2/2") and results[6]["retry_after"] == 1.0
    assert again.json()["results"] == [{"status_code": 200, "rollout_id": "c"}]  # duplicate even at capacity
    assert agent.ran == Counter({"a": 1, "c": 1})


@pytest.mark.parametrize(("body", "code"), [(b"{oops", 400), (b'{"requests": []}', 422), (b"[1]", 422),
                                             (b'{"requests": {"metadata": {}}}', 422)])
async def test_a_request_that_fails_every_item_fails_whole(body: bytes, code: int) -> None:
    with serve_app(create_env_app(Sleeper(), token="s3cret")) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            headers = {"Content-Type": "application/json"}
            anonymous = await raw.post("/init/batch", json={"requests": [{"metadata": md("x")}]})
            resp = await raw.post("/init/batch", content=body, headers={**headers, "Authorization": "Bearer s3cret"})
    assert anonymous.status_code == 401
    assert resp.status_code == code and resp.json()["detail"]


async def test_client_sends_rollouts_started_together_as_one_batch() -> None:
    agent = Sleeper()
    app = Recorder(create_env_app(agent))
    with serve_app(app) as url:
        async with EnvClient(url) as env:
            ids = [f"r{i}" for i in range(20)]
            started = await asyncio.gather(*(env.init(request(rid)) for rid in ids))
            assert [s.rollout_id for s in started] == ids
            done: dict[str, Any] = {}
            while len(done) < len(ids):
                done.update(await env.wait_many([i for i in ids if i not in done], timeout_s=10))
            await env.init(request("r0"))  # a repeat starts nothing
    assert app.calls[("GET", "/version")] == 1
    assert app.calls[("POST", "/init/batch")] == 2 and app.calls[("POST", "/init")] == 0
    assert all(st.status is not None and st.status.ok and st.reward == 1.0 for st in done.values())
    assert agent.ran == Counter(ids)


async def test_refused_items_are_retried_like_refused_inits() -> None:
    """At capacity: with retries, the refused inits wait out Retry-After and start; without, 429."""
    agent = Sleeper()
    app = Recorder(create_env_app(agent, max_concurrency=2))
    with serve_app(app) as url:
        async with EnvClient(url, max_retries=3) as env:
            await asyncio.gather(*(env.init(request(f"q{i}", 0.2)) for i in range(4)))
            pending = {"q2", "q3"}  # started last, after Retry-After: wait for them to free their places
            while pending:
                pending -= set(await env.wait_many(sorted(pending), timeout_s=10))
        async with EnvClient(url, max_retries=0) as env:
            outcomes = await asyncio.gather(*(env.init(request(f"z{i}", 5)) for i in range(3)),
                                            return_exceptions=True)
    assert sorted(agent.ran) == ["q0", "q1", "q2", "q3", "z0", "z1"]
    assert app.calls[("POST", "/init/batch")] >= 3 and app.calls[("POST", "/init")] == 0
    error = outcomes[2]
    assert isinstance(error, CapacityError) and error.status_code == 429 and "at capacity" in str(error)
    assert outcomes[:2] == [InitResponse(rollout_id="z0"), InitResponse(rollout_id="z1")]


async def test_a_wrong_token_fails_each_init_as_alone() -> None:
    with serve_app(create_env_app(Sleeper(), token="s3cret")) as url:
        async with EnvClient(url, token="wrong") as env:
            outcomes = await asyncio.gather(*(env.init(request(f"t{i}")) for i in range(3)), return_exceptions=True)
    assert all(isinstance(e, AuthError) and e.status_code == 401 and "bearer token" in e.body for e in outcomes)


def foreign_app(advertise: bool) -> FastAPI:
    """An eval-protocol style server: /init and /status only (with `advertise`, a /version that
    claims init_batch although /init/batch is not there)."""
    app = FastAPI()
    started: set[str] = set()

    @app.post("/init")
    async def init(request: Request) -> JSONResponse:
        started.add((await request.json())["metadata"]["rollout_id"])
        return JSONResponse({}, status_code=200)

    @app.get("/status")
    async def status(rollout_id: str) -> JSONResponse:
        return JSONResponse({"terminated": rollout_id in started, "info": {}})

    if advertise:
        @app.get("/version")
        async def version() -> dict[str, Any]:
            return {"protocol_version": "1", "name": "liar", "capabilities": ["init_batch"]}

    return app


async def test_a_batch_without_an_answer_goes_one_init_at_a_time() -> None:
    """A server whose /init/batch hangs (or fails) costs the inits at most INIT_BATCH_TIMEOUT_S."""
    app = foreign_app(advertise=True)

    @app.post("/init/batch")
    async def hang() -> None:
        await asyncio.sleep(INIT_BATCH_TIMEOUT_S + 1)  # past the client's patience; then the server may stop

    counting = Recorder(app)
    with serve_app(counting) as url:
        async with EnvClient(url) as env:
            t0 = time.monotonic()
            started = await asyncio.gather(*(env.init(request(f"h{i}")) for i in range(4)))
            took = time.monotonic() - t0
    assert [s.rollout_id for s in started] == ["h0", "h1", "h2", "h3"]
    assert counting.calls[("POST", "/init/batch")] == 1 and counting.calls[("POST", "/init")] == 4
    assert INIT_BATCH_TIMEOUT_S <= took < INIT_BATCH_TIMEOUT_S + 5


@pytest.mark.parametrize("advertise", [False, True])
async def test_servers_without_it_get_one_init_per_rollout(advertise: bool) -> None:
    app = Recorder(foreign_app(advertise))
    with serve_app(app) as url:
        async with EnvClient(url) as env:
            for _ in range(2):
                await asyncio.gather(*(env.init(request(f"f{i}")) for i in range(5)))
            st = await env.status("f3")
    assert st.terminated
    assert app.calls[("POST", "/init")] == 10 and app.calls[("GET", "/version")] == 1
    assert app.calls[("POST", "/init/batch")] == (1 if advertise else 0)  # a 404 once, then per rollout


async def test_scheduler_starts_a_group_with_one_batch() -> None:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
        return 1.0

    env_app = Recorder(create_env_app(agent))
    with serve_app(env_app) as url:
        pool = EnvPool([EnvEndpoint(url=url)], poll_s=1.0)
        sched = RolloutScheduler(pool, ExternalEndpoint("http://127.0.0.1:9/v1", None), completion_params={},
                                 evaluator=None, deadline_s=10.0, max_retries=0, max_in_flight=64, run_id="run")
        tasks = [(i, Task(messages=[{"role": "user", "content": f"q{i}"}])) for i in range(3)]
        try:
            groups = await sched.run_groups(tasks, group_size=4, step=1)
        finally:
            await pool.aclose()
    assert [r.reward for g in groups for r in g.rollouts] == [1.0] * 12
    assert env_app.calls[("POST", "/init/batch")] == 1 and env_app.calls[("POST", "/init")] == 0

