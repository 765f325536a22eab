"""Traces from an env's step to the tokens trained from it (`trace: true`; needs `openrft[otel]`).

One trace per rollout attempt: the scheduler opens its root span (`rollout`) and sends its W3C
`traceparent` to the env in `/init` as `metadata.traceparent` (an extra field: RolloutMetadata is
open in both protocols, and a server that does not know it ignores it). env_sdk's model client
sends it back on every gateway call; an env with spans of its own sends its step's `traceparent`
instead. The gateway adds `gateway.chat_completion` (token counts, latency) under whichever parent
came, and the trainer adds `train.step` and one `train.sample` per trained sequence, in the
rollout's trace, with its advantage and a link to the step. Spans go through OpenTelemetry's SDK to
RUN_DIR/traces.jsonl (the dashboard's timeline), and to an OTLP/HTTP collector when one is named.

Off (the default) every function returns at its first line: no import of opentelemetry, no cost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_tracer: Any = None
_provider: Any = None
_roots: dict[str, Any] = {}  # rollout id -> its open root span
_done: dict[str, Any] = {}  # rollout id -> the finished root's span context (for the step's samples)


class TracingUnavailable(RuntimeError):
    """`trace: true` without the OpenTelemetry SDK installed."""


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _exporter(path: Path) -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonlSpanExporter(SpanExporter):  # one span a line, in the dashboard's shape
        def export(self, spans: Sequence[Any]) -> Any:
            with path.open("a") as fh:
                for s in spans:
                    fh.write(json.dumps({
                        "trace_id": _hex(s.context.trace_id, 32), "span_id": _hex(s.context.span_id, 16),
                        "parent_id": _hex(s.parent.span_id, 16) if s.parent else None, "name": s.name,
                        "start_ns": s.start_time, "end_ns": s.end_time, "attributes": dict(s.attributes or {}),
                        "links": [_hex(link.context.span_id, 16) for link in s.links],
                    }, default=str) + "\n")
            return SpanExportResult.SUCCESS

    return JsonlSpanExporter()


def enable(run_dir: Path, otlp_endpoint: str | None = None) -> None:
    """Start exporting spans to RUN_DIR/traces.jsonl (and to `otlp_endpoint` over OTLP/HTTP)."""
    global _tracer, _provider
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(f"trace: true needs the OpenTelemetry SDK: pip install 'openrft[otel]' ({exc})") from None
    _provider = TracerProvider(resource=Resource.create({"service.name": "openrft-trainer"}))
    _provider.add_span_processor(BatchSpanProcessor(_exporter(run_dir / "traces.jsonl")))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingUnavailable(f"trace.otlp_endpoint needs the OTLP exporter: pip install 'openrft[otel]' ({exc})") from None
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    _tracer = _provider.get_tracer("openrft")


def disable() -> None:
    """Flush and stop (the end of a run)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
    _roots.clear()
    _done.clear()


def _traceparent(context: Any) -> str:
    return f"00-{_hex(context.trace_id, 32)}-{_hex(context.span_id, 16)}-{_hex(int(context.trace_flags), 2)}"


def start_rollout(rollout_id: str) -> str | None:
    """Open the rollout's trace; its `traceparent`, or None when tracing is off."""
    if _tracer is None:
        return None
    span = _tracer.start_span("rollout", attributes={"openrft.rollout_id": rollout_id})
    _roots[rollout_id] = span
    return _traceparent(span.get_span_context())


def end_rollout(rollout_id: str, status_code: int) -> None:
    if _tracer is None or (span := _roots.pop(rollout_id, None)) is None:
        return
    span.set_attribute("openrft.status_code", status_code)
    span.end()
    _done[rollout_id] = span.get_span_context()


def model_call(traceparent: str | None, rollout_id: str, *, prompt_tokens: int, completion_tokens: int,
               start_ns: int, end_ns: int) -> None:
    """The gateway's span of one chat completion, under the `traceparent` the env sent."""
    if _tracer is None or not traceparent:
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span = _tracer.start_span("gateway.chat_completion", context=parent, start_time=start_ns, attributes={
        "openrft.rollout_id": rollout_id, "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.usage.output_tokens": completion_tokens, "openrft.latency_ms": (end_ns - start_ns) / 1e6})
    span.end(end_time=end_ns)


def trained(step: int, samples: Sequence[Any], *, start_ns: int, end_ns: int) -> None:
    """`train.step`, and a `train.sample` (advantage, tokens) in each trained rollout's trace, linked to it."""
    if _tracer is None:
        return
    from opentelemetry import trace

    step_span = _tracer.start_span("train.step", start_time=start_ns,
                                   attributes={"openrft.step": step, "openrft.samples": len(samples)})
    link = trace.Link(step_span.get_span_context())
    for sample in samples:
        root = _done.get(sample.rollout_id)
        context = trace.set_span_in_context(trace.NonRecordingSpan(root)) if root else None
        span = _tracer.start_span("train.sample", context=context, links=[link], start_time=start_ns, attributes={
            "openrft.rollout_id": sample.rollout_id, "openrft.step": step, "openrft.advantage": float(sample.advantage),
            "openrft.tokens": len(sample.input_ids), "openrft.trained_tokens": int(sum(sample.loss_mask))})
        span.end(end_time=end_ns)
    step_span.end(end_time=end_ns)
    _done.clear()
