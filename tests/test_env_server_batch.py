"""Batched status and long-poll: a trainer with many rollouts in flight asks once, and the server
answers as soon as one of them is terminal (asyncio events, not a sleep loop)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from env_sdk import InitRequest, RolloutMetadata, RolloutTask, create_env_app
from tests.helpers import serve_app


async def sleeper(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
    await asyncio.sleep(float(task.task_metadata.get("sleep", 0)))
    return 1.0


def init_body(rid: str, sleep: float) -> str:
    md = RolloutMetadata(invocation_id="i", experiment_id="e", rollout_id=rid, run_id="u", row_id="w")
    return InitRequest(metadata=md, task_metadata={"sleep": sleep}).model_dump_json()


async def test_batch_long_poll_returns_when_the_first_rollout_finishes() -> None:
    with serve_app(create_env_app(sleeper)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as raw:
            for rid, sleep in [("slow1", 20), ("slow2", 20)]:
                assert (await raw.post("/init", content=init_body(rid, sleep))).status_code == 202
            t0 = time.monotonic()  # from the start of "fast", which finishes 1 s later
            assert (await raw.post("/init", content=init_body("fast", 1.0))).status_code == 202
            resp = await raw.post("/status/batch", json={"rollout_ids": ["slow1", "fast", "slow2"], "wait_s": 10})
            first = time.monotonic() - t0
            t0 = time.monotonic()
            empty = await raw.post("/status/batch", json={"rollout_ids": ["slow1", "slow2"], "wait_s": 0.3})
            timed_out = time.monotonic() - t0
            t0 = time.monotonic()
            now = await raw.post("/status/batch", json={"rollout_ids": ["slow1", "fast"], "wait_s": 10})
            immediate = time.monotonic() - t0
    body = resp.json()
    assert list(body["statuses"]) == ["fast"] and body["unknown"] == []
    assert body["statuses"]["fast"]["terminated"] is True and body["statuses"]["fast"]["reward"] == 1.0
    assert 0.9 < first < 4.0  # woke on the finish, long before wait_s (10 s); loose bounds: shared CPU
    assert empty.json() == {"statuses": {}, "unknown": []} and 0.25 < timed_out < 3.0
    assert list(now.json()["statuses"]) == ["fast"] and immediate < 3.0


async def test_unknown_ids_end_the_long_poll_at_once() -> None:
    with serve_app(create_env_app(sleeper)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as raw:
            await raw.post("/init", content=init_body("running", 20))
            t0 = time.monotonic()
            resp = await raw.post("/status/batch", json={"rollout_ids": ["running", "ghost"], "wait_s": 10})
            elapsed = time.monotonic() - t0
    assert resp.json() == {"statuses": {}, "unknown": ["ghost"]} and elapsed < 4.0


async def test_concurrent_long_polls_wake_only_for_their_own_ids() -> None:
    with serve_app(create_env_app(sleeper)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as raw:
            await raw.post("/init", content=init_body("a", 0.2))
            await raw.post("/init", content=init_body("b", 1.5))

            async def poll(ids: list[str]) -> tuple[float, dict[str, object]]:
                t0 = time.monotonic()
                r = await raw.post("/status/batch", json={"rollout_ids": ids, "wait_s": 10})
                return time.monotonic() - t0, r.json()["statuses"]

            (ta, sa), (tb, sb) = await asyncio.gather(poll(["a"]), poll(["b"]))
    assert list(sa) == ["a"] and list(sb) == ["b"]
    assert ta < tb and 0.5 < tb < 6.0


async def test_single_status_long_poll() -> None:
    with serve_app(create_env_app(sleeper)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as raw:
            await raw.post("/init", content=init_body("lp", 1.0))
            running = await raw.get("/status", params={"rollout_id": "lp"})
            t0 = time.monotonic()
            done = await raw.get("/status", params={"rollout_id": "lp", "wait_s": 10})
            elapsed = time.monotonic() - t0
    assert running.json() == {"terminated": False, "status": {"code": 101, "message": "Rollout is running",
                                                              "details": []}, "info": {}}
    assert done.json()["terminated"] is True and done.json()["status"]["code"] == 100
    assert elapsed < 4.0
