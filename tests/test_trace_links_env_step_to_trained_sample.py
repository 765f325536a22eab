"""One trace per rollout, from the env's step to the tokens trained from it (`trace.enabled`, OpenTelemetry
SDK): a real tiny-model run against an env_sdk server on loopback whose agent opens an OpenTelemetry
span of its own (`env.step`) under the `traceparent` the trainer sent in /init, and calls the model
with that span's context; a second call relies on the SDK's client, which forwards the rollout's.
The trainer's spans (RUN_DIR/traces.jsonl) must chain: rollout -> env.step -> gateway.chat_completion,
rollout -> gateway.chat_completion, and rollout -> train.sample carrying the advantage that the token
dump says was trained; the same spans reach an OTLP/HTTP receiver on loopback. With tracing off (the
default) the env sees no traceparent and no file is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI, Request

from env_sdk import AgentResult, EnvClient, RolloutTask, create_env_app
from tests.helpers import init_request, serve_app
from tests.test_train_e2e import tiny_model, write_config  # noqa: F401 (fixture)
from trainer.commands.train import main
from trainer.dashboard import RunsDir

pytest.importorskip("opentelemetry.sdk", reason="the `otel` extra")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: E402

ENV_SPANS = InMemorySpanExporter()
_provider = TracerProvider()  # the env's own tracer, apart from the trainer's
_provider.add_span_processor(SimpleSpanProcessor(ENV_SPANS))
ENV_TRACER = _provider.get_tracer("test-env")
SEEN_TRACEPARENT: list[str | None] = []


async def traced_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    SEEN_TRACEPARENT.append(task.traceparent)
    messages = list(task.messages)
    parent = TraceContextTextMapPropagator().extract({"traceparent": task.traceparent} if task.traceparent else {})
    with ENV_TRACER.start_as_current_span("env.step", context=parent, attributes={"rollout_id": task.metadata.rollout_id}):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)  # this span's traceparent
        reply = await client.chat.completions.create(messages=messages, extra_headers=carrier, **task.completion_kwargs())
    messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    messages.append({"role": "user", "content": "Again."})
    reply = await client.chat.completions.create(messages=messages, **task.completion_kwargs())  # the SDK's header
    text = reply.choices[0].message.content or ""
    messages.append({"role": "assistant", "content": text})
    return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)), messages=messages,
                       termination_reason="stop")


def test_env_step_gateway_call_and_trained_sample_share_one_trace(tmp_path: Path, tiny_model: Path) -> None:  # noqa: F811
    collector, exported = FastAPI(), []  # an OTLP/HTTP receiver on loopback

    @collector.post("/v1/traces")
    async def receive(request: Request) -> dict[str, Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        exported.extend(s.name for r in message.resource_spans for ss in r.scope_spans for s in ss.spans)
        return {}

    with serve_app(create_env_app(traced_agent)) as env_url, serve_app(collector) as otlp:
        config = write_config(tmp_path, tiny_model, env_url, steps=2,
                              trace={"enabled": True, "otlp_endpoint": f"{otlp}/v1/traces"})
        assert main([str(config)]) == 0
    run = tmp_path / "run"
    spans = [json.loads(line) for line in (run / "traces.jsonl").read_text().splitlines()]
    by_id = {s["span_id"]: s for s in spans}
    env_steps = {format(s.context.span_id, "016x"): s for s in ENV_SPANS.get_finished_spans()}

    samples = [s for s in spans if s["name"] == "train.sample"]
    tokens = [json.loads(line) for f in sorted((run / "tokens").glob("step_*.jsonl")) for line in f.read_text().splitlines()]
    assert len(samples) == len(tokens) > 0
    assert sorted((s["attributes"]["openrft.rollout_id"], s["attributes"]["openrft.advantage"]) for s in samples) == \
        sorted((t["rollout_id"], pytest.approx(t["advantage"], abs=1e-6)) for t in tokens)
    for sample in samples:
        rid = sample["attributes"]["openrft.rollout_id"]
        root = by_id[sample["parent_id"]]
        assert root["name"] == "rollout" and root["attributes"]["openrft.rollout_id"] == rid
        assert by_id[sample["links"][0]]["name"] == "train.step"
        calls = [s for s in spans if s["name"] == "gateway.chat_completion" and s["trace_id"] == root["trace_id"]]
        assert len(calls) == 2 and all(c["attributes"]["gen_ai.usage.output_tokens"] > 0 for c in calls)
        first, second = sorted(calls, key=lambda c: c["start_ns"])
        step = env_steps[first["parent_id"]]  # env step -> gateway call
        assert format(step.context.trace_id, "032x") == root["trace_id"]
        assert format(step.parent.span_id, "016x") == root["span_id"]  # rollout -> env step
        assert second["parent_id"] == root["span_id"]  # the SDK forwarded the rollout's traceparent itself
        # the dashboard's timeline of this rollout holds the whole chain
        names = [s["name"] for s in RunsDir(run).trace(".", rid)]
        assert names.count("gateway.chat_completion") == 2 and "train.sample" in names and names[0] == "rollout"
    # the same spans went to the OTLP collector
    assert sorted(exported) == sorted(s["name"] for s in spans)


def test_tracing_off_sends_nothing_and_writes_nothing(tmp_path: Path, tiny_model: Path) -> None:  # noqa: F811
    SEEN_TRACEPARENT.clear()
    with serve_app(create_env_app(traced_agent)) as env_url:
        assert main([str(write_config(tmp_path, tiny_model, env_url, steps=1))]) == 0
    assert SEEN_TRACEPARENT and set(SEEN_TRACEPARENT) == {None}
    assert not (tmp_path / "run" / "traces.jsonl").exists()


async def test_a_lone_init_carries_the_traceparent_header_and_metadata() -> None:
    """A server without /init/batch (an eval-protocol one, say) gets the header as well as the field."""
    seen: list[tuple[str | None, Any]] = []
    app = FastAPI()

    @app.post("/init")
    async def init(request: Request) -> dict[str, str]:
        body = await request.json()
        seen.append((request.headers.get("traceparent"), body["metadata"].get("traceparent")))
        return {"status": "accepted", "rollout_id": body["metadata"]["rollout_id"]}

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = init_request("r1")
    request.metadata = request.metadata.model_copy(update={"traceparent": traceparent})
    with serve_app(app) as url:
        async with EnvClient(url) as client:
            await client.init(request)
            await client.init(init_request("r2"))  # tracing off: neither
    assert seen == [(traceparent, traceparent), (None, None)]
