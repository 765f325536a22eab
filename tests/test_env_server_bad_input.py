"""Bad input to a real env server gets a 4xx whose message names the field; never a 500."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from env_sdk import RolloutTask, create_env_app
from tests.helpers import serve_app

GOOD = {
    "metadata": {"invocation_id": "i", "experiment_id": "e", "rollout_id": "r", "run_id": "u", "row_id": "w"},
    "messages": [{"role": "user", "content": "hi"}],
}


async def noop(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
    return 1.0


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_app(create_env_app(noop, token=None, max_body_bytes=64 * 1024)) as base:
        yield base


def with_(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = body
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (with_(metadata__rollout_id=...), 422, "metadata.rollout_id"),
        (with_(metadata=...), 422, "metadata"),
        (with_(metadata__rollout_id=""), 422, "metadata.rollout_id"),
        (with_(metadata__run_id=7), 422, "metadata.run_id"),
        (with_(messages="hello"), 422, "messages"),
        (with_(messages=[{"content": "no role"}]), 422, "messages.0.role"),
        (with_(completion_params=[1, 2]), 422, "completion_params"),
        (with_(deadline_s=-1), 422, "deadline_s"),
        (with_(tools={"not": "a list"}), 422, "tools"),
        ([1, 2, 3], 422, "body"),
    ],
)
def test_invalid_init_body_names_the_field(url: str, body: Any, status: int, field: str) -> None:
    resp = httpx.post(f"{url}/init", json=body)
    assert resp.status_code == status, resp.text
    data = resp.json()
    assert field in [e["field"] for e in data["errors"]], data
    assert field in data["detail"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"metadata": {', b"\xff\xfe"])
def test_malformed_json_is_400(url: str, raw: bytes) -> None:
    resp = httpx.post(f"{url}/init", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 422), resp.text
    assert resp.json()["detail"]
    if raw:
        assert resp.status_code == 400 and "JSON" in resp.json()["detail"]


def test_text_content_type_is_explained(url: str) -> None:
    resp = httpx.post(f"{url}/init", content=json.dumps(GOOD), headers={"Content-Type": "text/plain"})
    assert resp.status_code == 422 and "JSON object" in resp.json()["detail"]


def test_oversized_body_is_413(url: str) -> None:
    big = with_(messages=[{"role": "user", "content": "x" * 100_000}])
    resp = httpx.post(f"{url}/init", json=big)
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]


def test_oversized_chunked_body_is_413(url: str) -> None:
    """No Content-Length: the cap applies while the body streams in."""

    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}]}'

    resp = httpx.post(f"{url}/init", content=chunks())
    assert resp.status_code == 413, resp.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("GET", "/status", {}, 422, "rollout_id"),
        ("GET", "/status", {"params": {"rollout_id": "r", "wait_s": "soon"}}, 422, "wait_s"),
        ("GET", "/status", {"params": {"rollout_id": "r", "wait_s": 3600}}, 422, "wait_s"),
        ("POST", "/cancel", {}, 422, "rollout_id"),
        ("POST", "/status/batch", {"json": {"rollout_ids": []}}, 422, "rollout_ids"),
        ("POST", "/status/batch", {"json": {"rollout_ids": "r"}}, 422, "rollout_ids"),
        ("POST", "/status/batch", {"json": {"rollout_ids": ["r"], "wait_s": -1}}, 422, "wait_s"),
    ],
)
def test_invalid_parameters_name_the_field(url: str, method: str, path: str, kwargs: dict[str, Any], status: int,
                                           field: str) -> None:
    resp = httpx.request(method, f"{url}{path}", **kwargs)
    assert resp.status_code == status, resp.text
    assert field in resp.json()["detail"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/status"), ("POST", "/cancel")])
def test_unknown_rollout_is_404_naming_it(url: str, method: str, path: str) -> None:
    resp = httpx.request(method, f"{url}{path}", params={"rollout_id": "ghost-17"})
    assert resp.status_code == 404 and "ghost-17" in resp.json()["detail"]


def test_unknown_ids_in_a_batch_are_listed_not_an_error(url: str) -> None:
    resp = httpx.post(f"{url}/status/batch", json={"rollout_ids": ["ghost-1", "ghost-2"]})
    assert resp.status_code == 200
    assert resp.json() == {"statuses": {}, "unknown": ["ghost-1", "ghost-2"]}


async def test_a_flood_of_garbage_never_gives_500(url: str) -> None:
    bodies: list[Any] = [None, 0, "s", [], {}, {"metadata": None}, {"metadata": []},
                         {"metadata": {"rollout_id": {"x": 1}}}, with_(messages=[None]),
                         with_(messages=[{"role": "tool", "tool_calls": "x"}]), with_(api_key=5),
                         with_(task_metadata=[]), with_(deadline_s="never"), with_(model_base_url=3)]

    async def send(client: httpx.AsyncClient) -> AsyncIterator[int]:
        for b in bodies:
            yield (await client.post("/init", content=json.dumps(b))).status_code

    async with httpx.AsyncClient(base_url=url) as client:
        codes = [c async for c in send(client)]
    assert all(400 <= c < 500 for c in codes), codes
