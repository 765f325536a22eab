"""Gateway access rules (per-rollout keys, unknown / closed rollouts) and eval-protocol's
`POST /logs` status push, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from env_sdk.models import RolloutMetadata, StatusCode
from tests.helpers import serve_app
from trainer.generation import ScriptedBackend
from trainer.gateway import Gateway
from trainer.models import build_tiny_tokenizer

HI = [{"role": "user", "content": "hi"}]


def meta(rid: str, **over: str) -> RolloutMetadata:
    ids = {"invocation_id": "inv", "experiment_id": "exp", "rollout_id": rid, "run_id": "run", "row_id": "row"} | over
    return RolloutMetadata(**ids)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tiny_tokenizer()


@pytest.fixture
def served(tokenizer) -> Iterator[tuple[Gateway, str]]:  # type: ignore[no-untyped-def]
    gateway = Gateway(ScriptedBackend(tokenizer, lambda ids, p: "ok"), tokenizer)
    with serve_app(gateway.app) as base:
        yield gateway, base


def oa(url: str, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url, api_key=key, max_retries=0)


async def test_keys_are_per_rollout(served) -> None:  # type: ignore[no-untyped-def]
    gateway, base = served
    url_a, key_a = gateway.open_rollout(meta("A"), base)
    url_b, key_b = gateway.open_rollout(meta("B"), base)
    assert key_a != key_b and "/rollout_id/A/" in url_a
    assert gateway.open_rollout(meta("A"), base) == (url_a, key_a)  # idempotent
    with pytest.raises(ValueError, match="other metadata"):
        gateway.open_rollout(meta("A", row_id="other"), base)
    assert [m.id for m in (await oa(url_a, key_a).models.list()).data] == ["policy"]
    with pytest.raises(openai.PermissionDeniedError):
        await oa(url_a, key_b).models.list()
    reply = await oa(url_a, key_a).chat.completions.create(model="policy", messages=HI)
    assert reply.choices[0].message.content == "ok"
    with pytest.raises(openai.PermissionDeniedError) as err:  # A's key on B
        await oa(url_b, key_a).chat.completions.create(model="policy", messages=HI)
    assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    async with httpx.AsyncClient() as http:
        missing = await http.post(url_a + "/chat/completions", json={"messages": HI})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert len(gateway.record("A").calls) == 1 and gateway.record("B").calls == []


async def test_unknown_mismatched_and_closed_rollouts_are_refused(served) -> None:  # type: ignore[no-untyped-def]
    gateway, base = served
    url, key = gateway.open_rollout(meta("C"), base)
    with pytest.raises(openai.NotFoundError) as err:
        await oa(url.replace("/rollout_id/C/", "/rollout_id/nope/"), key).chat.completions.create(model="policy", messages=HI)
    assert err.value.body["code"] == "rollout_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):  # right rollout id, wrong row id in the path
        await oa(url.replace("/row_id/row", "/row_id/other"), key).chat.completions.create(model="policy", messages=HI)
    await oa(url, key).chat.completions.create(model="policy", messages=HI)
    record = gateway.close_rollout("C")
    assert len(record.calls) == 1
    with pytest.raises(openai.PermissionDeniedError) as closed:
        await oa(url, key).chat.completions.create(model="policy", messages=HI)
    assert closed.value.body["code"] == "rollout_closed"  # type: ignore[index]
    with pytest.raises(KeyError):
        gateway.record("C")
    with pytest.raises(ValueError, match="closed"):
        gateway.open_rollout(meta("C"), base)
    with pytest.raises(ValueError, match="metadata.row_id"):
        gateway.open_rollout(meta("D", row_id="a/b"), base)


def log_body(rid: str, code: int | None, **extra: object) -> dict[str, object]:
    """What eval-protocol's FireworksTracingHttpHandler posts."""
    status = None if code is None else {"code": code, "message": "msg", "details": []}
    return {
        "program": "eval_protocol",
        "status": status,
        "message": f"Rollout {rid} update",
        "tags": [f"rollout_id:{rid}", "experiment_id:exp", "run_id:run"],
        "extras": {"logger_name": "x", "level": "INFO", "timestamp": "2025-01-01T00:00:00.000000Z"},
        **extra,
    }


async def test_logs_push_finishes_a_rollout(served) -> None:  # type: ignore[no-untyped-def]
    gateway, base = served
    gateway.open_rollout(meta("L"), base)  # opened on this loop; the server runs on another thread
    record = gateway.record("L")
    async with httpx.AsyncClient(base_url=base) as http:
        plain = await http.post("/logs", json=log_body("L", None))
        running = await http.post("/logs", json=log_body("L", StatusCode.RUNNING))
        assert plain.status_code == running.status_code == 200
        assert record.logged_status is None and not record.logged.is_set()
        done = await http.post("/v1/logs", json=log_body("L", float(StatusCode.FINISHED)))  # eval-protocol may send 100.0
        assert done.status_code == 200 and done.json()["terminal"] is True
        await asyncio.wait_for(record.logged.wait(), timeout=5)
        assert record.logged_status is not None and record.logged_status.code == StatusCode.FINISHED
        assert record.logged_status.message == "msg"

        unknown = await http.post("/logs", json=log_body("nobody", 100))
        assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]["message"]
        no_tag = await http.post("/logs", json={"status": {"code": 100}, "tags": ["run_id:x"]})
        assert no_tag.status_code == 400 and no_tag.json()["error"]["param"] == "tags"
        bad_tags = await http.post("/logs", json={"status": {"code": 100}, "tags": "rollout_id:L"})
        assert bad_tags.status_code == 400 and bad_tags.json()["error"]["param"] == "tags"
        bad_status = await http.post("/logs", json=log_body("L", None) | {"status": {"message": "no code"}})
        assert bad_status.status_code == 400 and bad_status.json()["error"]["param"] == "status.code"
        not_json = await http.post("/logs", content=b"nope")
        assert not_json.status_code == 400
        health = await http.get("/health")
        assert health.json() == {"status": "ok", "open_rollouts": 1}
        models = await http.get("/v1/models")
        assert models.json()["data"][0]["id"] == "policy"
