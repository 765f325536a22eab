"""Schemathesis (property-based fuzzing from the OpenAPI document) against a real env server and a
real gateway, each served by uvicorn on loopback: generated valid and invalid requests for every
operation, checked for no 5xx, only documented status codes, answers matching their schemas, invalid
input rejected. Also: with a token configured, every env endpoint of the OpenAPI document but the
two open probes refuses any request without it. A small budget per operation keeps this quick."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from env_sdk import RolloutTask, create_env_app
from env_sdk.models import RolloutMetadata
from env_sdk.server import OPEN_PATHS
from tests.helpers import serve_app
from trainer.generation import ScriptedBackend
from trainer.gateway import Gateway
from trainer.models import build_tiny_tokenizer

EXAMPLES = 25  # per operation and mode
TOKEN = "fuzz-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROLES = ("user", "assistant", "tool", "system")


async def echo_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
    return 0.5


def cases(op: Any, mode: GenerationMode = GenerationMode.POSITIVE, examples: int = EXAMPLES) -> Callable[..., Any]:
    """Decorate `check(case, label)` to run on `examples` generated cases of `op`."""

    def wrap(check: Callable[[Any, str], None]) -> Callable[[], None]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            check(case, op.label)

        return run

    return wrap


def fuzz(url: str, headers: dict[str, str], prepare: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, int]:
    """Run every operation's positive and negative cases; fail listing every operation that broke.
    `prepare(case)` may adjust a case and returns extra keyword arguments for call_and_validate."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    errors: list[str] = []
    calls: dict[str, int] = {}

    def check(case: Any, label: str) -> None:
        extra = prepare(case) if prepare else {}
        calls[label] = calls.get(label, 0) + 1
        case.call_and_validate(base_url=url, headers={**headers, **extra.pop("headers", {})}, **extra)

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                cases(op, mode)(check)()
            except Unsatisfiable:  # no parameters, no body: nothing invalid to send
                assert mode is GenerationMode.NEGATIVE
            except Exception as exc:  # noqa: BLE001 - collected, reported together
                errors.append(f"{op.label} ({mode.value}): {exc}")
    assert not errors, "\n\n".join(errors)
    return calls


@pytest.fixture(scope="module")
def env_url() -> Iterator[str]:
    with serve_app(create_env_app(echo_agent, token=TOKEN, max_concurrency=8)) as url:
        yield url


def test_env_server(env_url: str) -> None:
    calls = fuzz(env_url, AUTH)
    assert {"POST /init", "GET /status", "POST /status/batch", "POST /cancel", "GET /health",
            "GET /version"} <= set(calls)


def test_every_env_endpoint_needs_the_token(env_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{env_url}/openapi.json", headers=AUTH)
    ops = [r.ok() for r in schema.get_all_operations()]
    protected = [op for op in ops if op.path not in OPEN_PATHS]
    assert len(protected) >= 4 and {op.path for op in ops} >= OPEN_PATHS  # the open ones are documented too
    def refused(case: Any, label: str) -> None:
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            response = case.call(base_url=env_url, headers=auth)
            assert response.status_code == 401, (label, auth, response.status_code, response.text)

    for op in protected:
        cases(op, examples=10)(refused)()
    import httpx  # the documents describing the API are protected too

    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{env_url}{path}").status_code == 401


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Gateway, str]]:
    tokenizer = build_tiny_tokenizer()
    gw = Gateway(ScriptedBackend(tokenizer, lambda ids, params: "fuzzed"), tokenizer)
    with serve_app(gw.app) as url:
        yield gw, url


def test_gateway(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    meta = RolloutMetadata(invocation_id="inv", experiment_id="exp", rollout_id="fuzz", run_id="run", row_id="0")
    gw.open_rollout(meta, url)
    key = gw.record("fuzz").api_key
    ids = meta.model_dump()

    def prepare(case: Any) -> dict[str, Any]:
        """Half the chat requests go to the open rollout with its key, so bodies reach the model.
        There, and on /logs, a schema-valid body may still be refused for what a JSON Schema cannot
        say (an unknown role, stream=true; no `rollout_id:` tag): a 400 is an answer, not a failure.
        Every other check (no 5xx, documented codes, answer schemas) holds everywhere, and invalid
        input is refused everywhere else."""
        if "chat/completions" in case.operation.path and zlib.crc32(repr(case.body).encode()) % 2 == 0:
            case.path_parameters = {k: ids[k] for k in case.path_parameters}
            if isinstance(case.body, dict) and isinstance(case.body.get("messages"), list):
                for i, message in enumerate(case.body["messages"]):  # the schema's role is any string
                    if isinstance(message, dict):
                        message["role"] = ROLES[i % len(ROLES)]
            # (a negative case whose bad role was just replaced may be valid now: not judged on that)
            return {"headers": {"Authorization": f"Bearer {key}"},
                    "excluded_checks": [positive_data_acceptance, negative_data_rejection]}
        if case.operation.path.endswith("/logs"):  # eval-protocol's records are read leniently (a code of
            # 100.0, say), so a pydantic-coercible value is accepted there by design
            return {"excluded_checks": [positive_data_acceptance, negative_data_rejection]}
        return {}

    calls = fuzz(url, {}, prepare)
    assert {"GET /health", "GET /v1/models", "POST /logs", "POST /v1/logs"} <= set(calls)
    assert any("chat/completions" in label for label in calls)
    assert gw.record("fuzz").calls, "no fuzzed request reached the model"
