"""Compatibility with Fireworks' eval-protocol, with the real `eval-protocol` package as the other side.

- An openrft env server (`create_env_app`) takes the `/init` body eval-protocol's
  RemoteRolloutProcessor sends (its own `build_init_request` + `model_dump()`, posted with aiohttp as
  it does), and our `/status` answers validate as eval-protocol's `StatusResponse`; every status
  code round-trips.
- An env server written the eval-protocol way (only `POST /init`, an OpenAI client built from
  `model_base_url` + `api_key`, completion reported by eval-protocol's `FireworksTracingHttpHandler`
  to the trainer's gateway) trains with openrft's trainer unchanged.

eval-protocol is the `interop` extra (`pip install -e '.[interop]'`); without it these tests skip.
"""

from __future__ import annotations

import os

# litellm (imported by eval_protocol) fetches a price list on import unless told not to: offline it hangs.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

pytest.importorskip("eval_protocol", reason="eval-protocol is not installed (pip install -e '.[interop]')")

import aiohttp
from eval_protocol.log_utils.fireworks_tracing_http_handler import (
    FireworksTracingHttpHandler,
)
from eval_protocol.models import (
    EvaluationRow,
    ExecutionMetadata,
    InputMetadata,
    Message,
)
from eval_protocol.models import Status as EPStatus
from eval_protocol.pytest.tracing_utils import (
    build_fireworks_tracing_url,
    build_init_request,
)
from eval_protocol.pytest.types import RolloutProcessorConfig
from eval_protocol.types.remote_rollout_processor import InitRequest as EPInitRequest
from eval_protocol.types.remote_rollout_processor import (
    StatusResponse as EPStatusResponse,
)

from env_sdk import AgentResult, RolloutTask, create_env_app
from env_sdk.models import Status, StatusCode
from tests.helpers import free_port, scripted_model_app, serve_app

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                            "parameters": {"type": "object", "properties": {
                                                "a": {"type": "integer"}, "b": {"type": "integer"}},
                                                "required": ["a", "b"]}}}]


# --- a. eval-protocol's client side against an openrft env server ----------------------------------

SEEN_TASKS: dict[str, RolloutTask] = {}


async def answering_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    SEEN_TASKS[task.metadata.rollout_id] = task
    if "crash" in str(task.messages[-1].get("content")):
        raise RuntimeError("tool backend down")
    reply = await client.chat.completions.create(messages=task.messages, tools=task.tools, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    return AgentResult(reward=1.0, messages=[*task.messages, {"role": "assistant", "content": text}],
                       info={"answer": text}, termination_reason="stop")


def ep_row(rollout_id: str, question: str) -> EvaluationRow:
    """A dataset row as eval-protocol holds it: history with a tool call, ids filled in."""
    return EvaluationRow(
        messages=[
            Message(role="system", content="You add numbers."),
            Message(role="user", content="What is 2+2?"),
            Message(role="assistant", content="", tool_calls=[{"id": "call_1", "type": "function",
                                                               "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]),
            Message(role="tool", tool_call_id="call_1", name="add", content="4"),
            Message(role="assistant", content="4"),
            Message(role="user", content=question),
        ],
        tools=TOOLS,
        input_metadata=InputMetadata(row_id="row-7"),
        execution_metadata=ExecutionMetadata(invocation_id="inv-1", experiment_id="exp-1", rollout_id=rollout_id,
                                             run_id="run-1"),
    )


async def ep_send_init(env_url: str, model_url: str, row: EvaluationRow) -> EPInitRequest:
    """What RemoteRolloutProcessor does for one row: build_init_request, then aiohttp `json=model_dump()`."""
    config = RolloutProcessorConfig(completion_params={"model": "policy", "temperature": 0.3, "max_tokens": 32},
                                    mcp_config_path="", semaphore=asyncio.Semaphore(1))
    request = build_init_request(row, config, model_url)
    async with aiohttp.ClientSession() as session, session.post(f"{env_url}/init", json=request.model_dump()) as resp:
        assert resp.status < 400, await resp.text()
    return request


async def wait_terminal(env_url: str, rollout_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=env_url) as http:
        for _ in range(200):
            resp = await http.get("/status", params={"rollout_id": rollout_id})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            if body["terminated"]:
                return body
            await asyncio.sleep(0.02)
    raise AssertionError(f"rollout {rollout_id} did not finish")


async def test_eval_protocol_init_body_runs_on_an_openrft_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EP_REMOTE_API_KEY", "ep-key-123")  # where build_init_request takes api_key from
    model = scripted_model_app(lambda messages, tools: "2+2 is 4, and 3+3 is 6.")
    with serve_app(model) as model_url, serve_app(create_env_app(answering_agent)) as env_url:
        request = await ep_send_init(env_url, f"{model_url}/v1", ep_row("ep-ok", "And 3+3?"))
        body = await wait_terminal(env_url, "ep-ok")

        # the body was eval-protocol's full dump: nulls and its extra message fields included
        dumped = request.model_dump()
        assert {"function_call", "control_plane_step", "weight", "logprobs"} <= set(dumped["messages"][0])
        assert dumped["messages"][2]["tool_calls"][0]["function"]["name"] == "add"

        # the agent saw the conversation, tools and params eval-protocol sent
        task = SEEN_TASKS["ep-ok"]
        assert [(m["role"], m.get("content")) for m in task.messages] == [
            (m.role, m.content) for m in request.messages or []]
        assert task.messages[2]["tool_calls"][0]["function"]["arguments"] == '{"a": 2, "b": 2}'
        assert task.messages[3]["tool_call_id"] == "call_1"
        assert task.tools == TOOLS and task.metadata.row_id == "row-7" and task.metadata.invocation_id == "inv-1"
        # ... and called the model at model_base_url with eval-protocol's api_key and completion_params
        [call] = model.state.requests
        assert call["path"] == "v1/chat/completions" and call["auth"] == "Bearer ep-key-123"
        assert call["body"]["temperature"] == 0.3 and call["body"]["max_tokens"] == 32
        assert call["body"]["tools"] == TOOLS and len(call["body"]["messages"]) == 6

        # our /status is eval-protocol's StatusResponse (plus optional fields of ours)
        theirs = EPStatusResponse.model_validate(body)
        assert theirs.terminated and theirs.status is not None
        assert theirs.status.code == EPStatus.Code.FINISHED and theirs.info == {"answer": "2+2 is 4, and 3+3 is 6."}
        assert body["reward"] == 1.0 and body["termination_reason"] == "stop"

        # a crashing agent: a failure eval-protocol reads as INTERNAL
        await ep_send_init(env_url, f"{model_url}/v1", ep_row("ep-crash", "crash now"))
        theirs = EPStatusResponse.model_validate(await wait_terminal(env_url, "ep-crash"))
        assert theirs.status is not None and theirs.status.code == EPStatus.Code.INTERNAL
        assert "tool backend down" in theirs.status.message


def test_spec_example_is_what_eval_protocol_sends() -> None:
    """protocol/examples/InitRequest.eval_protocol.json is byte for byte eval-protocol's dump (bar the key)."""
    row = EvaluationRow(messages=[Message(role="user", content="What is the capital of France?")],
                        input_metadata=InputMetadata(row_id="rw-1"),
                        execution_metadata=ExecutionMetadata(invocation_id="iv-1", experiment_id="ex-1",
                                                             rollout_id="ro-9", run_id="rn-1"))
    config = RolloutProcessorConfig(completion_params={"model": "fireworks_ai/accounts/fireworks/models/qwen3-8b",
                                                       "temperature": 0.0, "max_tokens": 512},
                                    mcp_config_path="", semaphore=asyncio.Semaphore(1))
    sent = build_init_request(row, config, "https://tracing.fireworks.ai").model_dump()
    example = json.loads((Path(__file__).parents[1] / "protocol/examples/InitRequest.eval_protocol.json").read_text())
    assert {**sent, "api_key": None} == {**example, "api_key": None}


def test_status_codes_round_trip() -> None:
    assert {c.value: c.name for c in EPStatus.Code} == {c.value: c.name for c in StatusCode}
    for code in EPStatus.Code:
        theirs = EPStatus(code=code, message=f"m{code.value}", details=[{"reason": code.name}])
        ours = Status.model_validate(json.loads(theirs.model_dump_json()))
        assert ours.code == code.value and StatusCode(ours.code).name == code.name
        assert EPStatus.model_validate(json.loads(ours.model_dump_json())) == theirs


# --- b, c. an eval-protocol env server trains with openrft's trainer unchanged ----------------------

class EPStyleEnv:
    """An env written the eval-protocol way: `POST /init` only (no /health, no /status). The agent
    builds an OpenAI client from `model_base_url` and `api_key`, and reports completion by logging a
    `Status` through eval-protocol's FireworksTracingHttpHandler, pointed at the trainer's gateway."""

    def __init__(self, gateway_base_url: str, *, health: bool = False) -> None:
        self.requests: dict[str, EPInitRequest] = {}
        self.errors: list[str] = []
        self.logger = logging.getLogger("ep_style_env")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handler = FireworksTracingHttpHandler(gateway_base_url=gateway_base_url)
        self.logger.addHandler(self.handler)
        self.tasks: set[asyncio.Task[None]] = set()
        self.app = FastAPI()
        self.app.post("/init")(self.init)
        if health:  # a plain liveness route, as web apps often have; not openrft's Health
            self.app.get("/health")(lambda: {"status": "ok"})

    async def init(self, req: EPInitRequest) -> dict[str, str]:
        self.requests[req.metadata.rollout_id] = req
        task = asyncio.create_task(self.rollout(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return {"status": "started"}

    async def log(self, req: EPInitRequest, message: str, status: EPStatus) -> None:
        extra = {"rollout_id": req.metadata.rollout_id, "experiment_id": req.metadata.experiment_id,
                 "run_id": req.metadata.run_id, "status": status}
        await asyncio.to_thread(self.logger.info, message, extra=extra)  # the handler posts with sync requests

    async def rollout(self, req: EPInitRequest) -> None:
        await self.log(req, "rollout started", EPStatus.rollout_running())
        try:  # as eval-protocol's example server does: its Message objects straight into a sync client
            client = openai.OpenAI(base_url=req.model_base_url, api_key=req.api_key, max_retries=0)
            params = req.completion_params
            await asyncio.to_thread(client.chat.completions.create, messages=req.messages, model=params["model"],
                                    temperature=params.get("temperature"), max_tokens=params.get("max_tokens"))
            client.close()
            status = EPStatus.rollout_finished(extra_info={"env": "eval-protocol style"})
        except Exception as exc:  # noqa: BLE001 (reported to the trainer, as eval-protocol envs do)
            self.errors.append(f"{type(exc).__name__}: {exc}")
            status = EPStatus.rollout_internal_error(f"{type(exc).__name__}: {exc}")
        await self.log(req, "rollout finished", status)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


async def test_eval_protocol_env_with_a_plain_health_route_is_waited_for_by_logs() -> None:
    """`wait: auto` must not take an eval-protocol env for a v1 server (or a dead one) because it
    answers GET /health with a body of its own: its first /status answer (a 404: it has none) decides."""
    from trainer.config import EnvEndpoint
    from trainer.rollouts import EnvPool

    env = EPStyleEnv("http://127.0.0.1:9", health=True)
    try:
        with serve_app(env.app) as env_url:
            pool = EnvPool([EnvEndpoint(url=env_url)])
            try:
                assert await pool.probe() == [] and pool.slots[0].wait == "undecided"
                assert await pool.settle_wait(pool.slots[0], "ro-1") is None
                assert pool.slots[0].wait == "logs"
            finally:
                await pool.aclose()
    finally:
        env.close()


def vowel_score(messages: list[dict[str, Any]], ground_truth: Any, info: dict[str, Any]) -> Any:
    """Trainer-side evaluator: fraction of vowels in the model's answer (continuous: groups rarely tie)."""
    from env_sdk.models import EvaluationResult

    text = messages[-1].get("content") or ""
    return EvaluationResult(score=sum(c in "aeiou" for c in text) / max(1, len(text)), reason=f"trainer-side vowels:{len(text)}")


def test_eval_protocol_env_trains_with_openrft_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file

    from trainer.config import TrainConfig
    from trainer.models import build_tiny_model
    from trainer.commands.train import train

    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)  # the handler would send it as a bearer token
    model_dir = build_tiny_model(tmp_path / "model")
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something about {i}"}],
                                           "ground_truth": i}) + "\n" for i in range(4)))
    gateway_port = free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"  # what FW_TRACING_GATEWAY_BASE_URL would hold
    env = EPStyleEnv(gateway_url)
    started = time.monotonic()
    try:
        with serve_app(env.app) as env_url, caplog.at_level(logging.WARNING, logger="trainer"):
            # envs[].wait is "auto": the 404 of /status marks an eval-protocol env (reports via /logs)
            config = TrainConfig.model_validate({
                "model": str(model_dir), "dataset": str(dataset), "envs": [{"url": env_url}],
                "evaluator": f"{__name__}:vowel_score", "steps": 2, "tasks_per_step": 2, "group_size": 2,
                "sampling": {"max_tokens": 8}, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
                "rollout": {"deadline_s": 30, "max_retries": 0}, "gateway": {"port": gateway_port},
                "checkpoint_every": 2, "seed": 3, "run_dir": str(tmp_path / "run"), "progress": False,
            })
            run_dir = train(config)
    finally:
        env.close()
    assert time.monotonic() - started < 60
    assert not env.errors
    assert any("serves no /status" in r.getMessage() for r in caplog.records)  # detected as an eval-protocol env

    rows = [json.loads(line) for step in (1, 2) for line in (run_dir / "rollouts" / f"step_{step:06d}.jsonl").open()]
    assert len(rows) == 8 and set(env.requests) == {r["rollout_id"] for r in rows}
    for row in rows:
        # finished by the /logs push (there is no /status to poll): eval-protocol's own finished status
        assert row["status"] == {"code": 100, "message": "Rollout finished"}, row
        # the reward is the trainer-side evaluator's, on the conversation the gateway recorded
        answer = row["messages"][-1]["content"] or ""
        assert row["reason"] == f"trainer-side vowels:{len(answer)}"
        assert math.isclose(row["reward"], sum(c in "aeiou" for c in answer) / max(1, len(answer)))
        assert row["num_calls"] == 1 and row["attempts"] == 1

        # c. the env got a model_base_url of eval-protocol's tracing shape, and its OpenAI client used it
        req = env.requests[row["rollout_id"]]
        assert req.model_base_url == build_fireworks_tracing_url(f"{gateway_url}/v1", req.metadata)
        assert re.fullmatch(rf"{re.escape(gateway_url)}/v1/rollout_id/{re.escape(row['rollout_id'])}/invocation_id/"
                            r"[^/]+/experiment_id/[^/]+/run_id/[^/]+/row_id/\d+", req.model_base_url or "")
        assert req.api_key and req.completion_params["model"] == "policy"
        assert req.messages and req.messages[0].content.startswith("Say something about")

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["rollouts/failed"] == 0 and math.isfinite(m["loss"]) for m in metrics)
    assert sum(m["groups/trained"] for m in metrics) > 0
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # the step trained
