"""Bearer token: every endpoint but /health and /version needs it when the server has one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from env_sdk import RolloutTask, create_env_app
from tests.helpers import serve_app

BODY = {"metadata": {"invocation_id": "i", "experiment_id": "e", "rollout_id": "r", "run_id": "u", "row_id": "w"}}
PROTECTED = [
    ("POST", "/init", {"json": BODY}),
    ("GET", "/status", {"params": {"rollout_id": "r"}}),
    ("POST", "/status/batch", {"json": {"rollout_ids": ["r"]}}),
    ("POST", "/cancel", {"params": {"rollout_id": "r"}}),
    ("GET", "/openapi.json", {}),
]


async def noop(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
    return 1.0


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_app(create_env_app(noop, token="s3cret")) as base:
        yield base


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "s3cret", "Basic s3cret"])
def test_missing_or_wrong_token_is_401(url: str, method: str, path: str, kwargs: dict[str, Any],
                                       auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    resp = httpx.request(method, f"{url}{path}", headers=headers, **kwargs)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in resp.json()["detail"]


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret"])  # the scheme is case-insensitive
def test_the_right_token_opens_every_endpoint(url: str, header: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": header}) as c:
        assert c.post("/init", json=BODY).status_code in (200, 202)
        assert c.get("/status", params={"rollout_id": "r", "wait_s": 2}).json()["terminated"] is True
        assert c.post("/status/batch", json={"rollout_ids": ["r"]}).status_code == 200
        assert c.post("/cancel", params={"rollout_id": "r"}).json() == {"rollout_id": "r", "cancelled": False}


@pytest.mark.parametrize("path", ["/health", "/version"])
def test_health_and_version_are_open(url: str, path: str) -> None:
    resp = httpx.get(f"{url}{path}")
    assert resp.status_code == 200 and resp.json()["protocol_version"] == "1"
