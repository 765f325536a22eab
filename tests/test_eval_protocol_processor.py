"""eval-protocol's own client, `RemoteRolloutProcessor` (the client of Fireworks RFT and `ep` remote
evaluations), runs rows against an openrft env server with `openrft serve` as its tracing gateway
and model: real processor, real servers on loopback, a tiny real model.

The processor never reads the env's /status: it posts /init, polls `GET {model_base_url}/v1/status`,
reads `/logs`, then builds the row's conversation from `/v1/traces/pointwise`. The env server
pushes each finished rollout's status to `tracing_url` (env_sdk/status_push.py); `openrft serve`
keeps those pushes and the traces of the chat completions made under each rollout's URL.

eval-protocol is the `interop` extra (`pip install -e '.[interop]'`); without it this file skips.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm fetches a price list on import

import asyncio
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("eval_protocol", reason="eval-protocol is not installed (pip install -e '.[interop]')")

from eval_protocol.models import EvaluationRow, ExecutionMetadata, InputMetadata, Message, Status
from eval_protocol.pytest.remote_rollout_processor import RemoteRolloutProcessor
from eval_protocol.pytest.types import RolloutProcessorConfig

from reference_envs.math.server import create_app as math_env
from tests.helpers import free_port, serve_app


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`openrft serve`'s app on a tiny model, at http://localhost:<port> (the processor builds
    per-rollout URLs only for a gateway whose URL starts with http://localhost)."""
    from trainer.generation import TransformersBackend
    from trainer.models import build_tiny_model
    from trainer.commands.serve import create_app
    from trainer.models import load_policy

    model, tokenizer = load_policy(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))
    backend = TransformersBackend(model, tokenizer)
    port = free_port()
    with serve_app(create_app(backend, tokenizer), port=port):
        yield f"http://localhost:{port}"
    backend.close()


def rows(n: int, prefix: str) -> list[EvaluationRow]:
    return [EvaluationRow(messages=[Message(role="user", content=f"What is {i} + 30?")],
                          input_metadata=InputMetadata(row_id=f"row-{i}"),
                          execution_metadata=ExecutionMetadata(invocation_id="inv-1", experiment_id="exp-1",
                                                               rollout_id=f"{prefix}-{i}", run_id="run-1"))
            for i in range(n)]


async def run_rows(env_url: str, serve_url: str, batch: list[EvaluationRow], timeout_s: float) -> list[EvaluationRow]:
    processor = RemoteRolloutProcessor(remote_base_url=env_url, model_base_url=serve_url, poll_interval=0.1,
                                       timeout_seconds=timeout_s)
    config = RolloutProcessorConfig(completion_params={"model": "policy", "temperature": 0.7, "max_tokens": 8},
                                    mcp_config_path="", semaphore=asyncio.Semaphore(4))
    try:
        return list(await asyncio.gather(*processor(batch, config)))
    finally:
        await processor.acleanup()


async def test_remote_rollout_processor_finishes_rows_on_an_openrft_env(serve_url: str) -> None:
    with serve_app(math_env(tracing_url=serve_url)) as env_url:
        done = await run_rows(env_url, serve_url, rows(3, "ep-proc"), timeout_s=60)
        async with httpx.AsyncClient(base_url=env_url) as env:
            env_status = {r.execution_metadata.rollout_id: (await env.get(
                "/status", params={"rollout_id": r.execution_metadata.rollout_id})).json() for r in done}

    for row in done:
        rid = row.execution_metadata.rollout_id
        assert row.rollout_status.code == Status.Code.FINISHED, row.rollout_status
        # the row's conversation is the model's, as the env saw it: the question, then the answer
        assert [m.role for m in row.messages] == ["user", "assistant"]
        assert row.messages[0].content.endswith("+ 30?")
        answer = env_status[rid]["messages"][-1]
        assert answer["role"] == "assistant" and row.messages[-1].content == answer.get("content")
        assert row.execution_metadata.rollout_id == rid  # the trace's tags name the rollout


async def test_without_the_status_push_the_processor_never_sees_an_end(serve_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same env with pushing off: the rollouts finish on the env, but the processor (which
    reads only the gateway) times out: the push is what makes the first test pass."""
    monkeypatch.delenv("FW_TRACING_GATEWAY_BASE_URL", raising=False)
    with serve_app(math_env()) as env_url:
        [row] = await run_rows(env_url, serve_url, rows(1, "ep-silent"), timeout_s=1.5)
    assert row.rollout_status.code == Status.Code.DEADLINE_EXCEEDED


async def test_serve_answers_the_tracing_read_out(serve_url: str) -> None:
    """What the processor reads, field by field: status null before any push, then the pushed record."""
    async with httpx.AsyncClient(base_url=serve_url) as http:
        empty = (await http.get("/v1/status", params={"rollout_id": "ro-x"})).json()
        assert empty == {"rollout_id": "ro-x", "status": None, "extras": None}
        record = {"program": "eval_protocol", "message": "rollout finished", "tags": ["rollout_id:ro-x", "run_id:r"],
                  "status": {"code": 100, "message": "Rollout finished", "details": []},
                  "extras": {"logger_name": "x", "level": "INFO", "timestamp": "2026-01-01T00:00:00.000000Z",
                             "reward": 0.5}}
        assert (await http.post("/logs", json=record)).status_code == 200
        status = (await http.get("/v1/status", params={"rollout_id": "ro-x"})).json()
        assert status["status"]["code"] == 100 and status["extras"]["reward"] == 0.5
        logs = (await http.get("/logs", params={"tags": "rollout_id:ro-x", "program": "eval_protocol"})).json()
        assert [e["message"] for e in logs["entries"]] == ["rollout finished"]
        assert (await http.get("/logs", params={"tags": "run_id:r"})).status_code == 400  # no rollout_id tag
        bad = await http.post("/logs", json={"program": "eval_protocol", "tags": ["nothing"]})
        assert bad.status_code == 400 and "rollout_id" in bad.json()["error"]["message"]
