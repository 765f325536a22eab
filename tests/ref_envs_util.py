"""Shared by the reference-env tests: serve an env app and a scripted model for real on
loopback, and run one rollout through `EnvClient` the way the trainer does."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from env_sdk import EnvClient, InitRequest, RolloutMetadata, StatusResponse
from env_sdk.conformance import run_conformance
from tests.helpers import Script, scripted_model_app, serve_app


@contextlib.contextmanager
def env_and_model(env_app: Any, script: Script) -> Iterator[tuple[str, str, Any]]:
    """(env URL, model base URL, model app) with both servers running."""
    model_app = scripted_model_app(script)
    with serve_app(env_app) as env_url, serve_app(model_app) as model_url:
        yield env_url, model_url + "/v1", model_app


async def rollout(env_url: str, model_url: str, row: dict[str, Any], *, deadline_s: float = 60.0) -> StatusResponse:
    """One rollout of dataset `row` (its ground_truth is NOT sent); the terminal status."""
    rid = f"r-{uuid.uuid4().hex[:10]}"
    request = InitRequest(
        messages=row["messages"],
        tools=row.get("tools"),
        model_base_url=model_url,
        api_key="test-key",
        completion_params={"model": "scripted", "temperature": 0.0},
        metadata=RolloutMetadata(invocation_id="inv", experiment_id="exp", rollout_id=rid, run_id="run",
                                 row_id=str(row["metadata"].get("task_id", "row"))),
        task_metadata=row["metadata"],
    )
    async with EnvClient(env_url) as client:
        await client.init(request)
        return await client.wait(rid, deadline_s=deadline_s)


async def healthy(env_url: str) -> bool:
    async with EnvClient(env_url) as client:
        return (await client.health()).status == "ok"


def last_user_text(messages: list[dict[str, Any]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


async def assert_conformant(env_app: Any, row: dict[str, Any]) -> None:
    """`openrft conformance` (programmatically) passes against `env_app` serving `row`'s task."""
    with serve_app(env_app) as url:
        results = await run_conformance(url, task={"messages": row["messages"], "task_metadata": row["metadata"]})
    failed = [(r.name, r.detail) for r in results if r.status == "fail"]
    assert not failed, failed
    assert sum(r.status == "pass" for r in results) >= 10
