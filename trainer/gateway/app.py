"""The model gateway: the OpenAI-compatible endpoint the trainer hands to each environment.

Each rollout gets its own base URL (eval-protocol's path shape, ids in the path) and its own
API key, so every completion is attributed to its rollout without trusting the env, and a
key given for rollout A is refused for rollout B. For every call the gateway records the
exact prompt token ids, completion token ids and sampling logprobs (`CallRecord`); training
uses those, never a re-tokenization of the text.

`POST /logs` (and `/v1/logs`) accepts eval-protocol's status log records
(`FireworksTracingHttpHandler` payloads: `{program, status, message, tags, extras}`, the
rollout named by a `rollout_id:<id>` tag). A terminal status (any code but RUNNING) finishes
the rollout: `record.logged_status` is set and `record.logged` fires. These posts are not
checked against the rollout's key: eval-protocol's handler sends whatever FIREWORKS_API_KEY
holds, and a log record can end a rollout but never add tokens to it.

Run the app on the event loop of the code that awaits `record.logged` (uvicorn's
`Server.serve()` as a task), or from another thread: the event is set thread-safely.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from env_sdk.models import RolloutMetadata, Status, StatusCode
from trainer import traces
from trainer.types import GenerationBackend
from trainer.types import CallRecord, extends
from trainer.gateway.tracing import LogRecordBody, TraceStore, add_tracing_routes, parse_log_record
from trainer.gateway.http import OPENAI_ERROR, serve_plain
from trainer.gateway.completions import ChatCompleter, ChatCompletionRequest, Completion
from trainer.gateway.http import APIError, install_error_handlers, read_json
from trainer.gateway.streaming import completion_response

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLLOUT_PATH = (
    "/v1/rollout_id/{rollout_id}/invocation_id/{invocation_id}/experiment_id/{experiment_id}"
    "/run_id/{run_id}/row_id/{row_id}"
)
ROLLOUT_IDS = ("rollout_id", "invocation_id", "experiment_id", "run_id", "row_id")


@dataclass
class RolloutRecord:
    metadata: RolloutMetadata
    api_key: str
    calls: list[CallRecord] = field(default_factory=list)
    prefix_mismatch: bool = False  # a call's prompt did not extend a previous prompt + completion
    logged_status: Status | None = None  # from POST /logs (eval-protocol push), else None
    logged: asyncio.Event = field(default_factory=asyncio.Event)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads its JSON itself (to answer errors in OpenAI's
    shape after the auth checks): `model`'s JSON Schema, its $defs inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


@dataclass
class _Open:
    record: RolloutRecord
    loop: asyncio.AbstractEventLoop | None  # where `record.logged` is awaited
    last_calls: list[CallRecord] = field(default_factory=list)  # the previous request's choices


class Gateway:
    def __init__(
        self,
        backend: GenerationBackend,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_name: str = "policy",
        default_max_tokens: int = 256,
        tool_parser: str = "hermes",
    ) -> None:
        self.completer = ChatCompleter(
            backend, tokenizer, model_name=model_name, default_max_tokens=default_max_tokens, tool_parser=tool_parser
        )
        self._open: dict[str, _Open] = {}
        self._closed: set[str] = set()
        self.traces = TraceStore()
        self.app = self._build_app()

    # --- trainer-side API -------------------------------------------------------------------

    def open_rollout(self, metadata: RolloutMetadata, base_url: str) -> tuple[str, str]:
        """Register a rollout; return (model_base_url, api_key) for its InitRequest.

        `base_url` is where this gateway's app is reachable (e.g. http://127.0.0.1:8400).
        Opening an open rollout again with the same metadata returns the same URL and key."""
        rid = metadata.rollout_id
        for name in ROLLOUT_IDS:
            value = getattr(metadata, name)
            if not value or "/" in value:
                raise ValueError(f"metadata.{name} must be non-empty and contain no '/': {value!r}")
        if rid in self._closed:
            raise ValueError(f"rollout {rid!r} was closed; use a new rollout_id")
        existing = self._open.get(rid)
        if existing is not None:
            if existing.record.metadata != metadata:
                raise ValueError(f"rollout {rid!r} is already open with other metadata")
            return self._model_url(metadata, base_url), existing.record.api_key
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        record = RolloutRecord(metadata=metadata, api_key=f"rk-{secrets.token_urlsafe(24)}")
        self._open[rid] = _Open(record, loop)
        return self._model_url(metadata, base_url), record.api_key

    def record(self, rollout_id: str) -> RolloutRecord:
        """The live record of an open rollout."""
        try:
            return self._open[rollout_id].record
        except KeyError:
            raise KeyError(f"rollout {rollout_id!r} is not open") from None

    def close_rollout(self, rollout_id: str) -> RolloutRecord:
        """Stop serving a rollout and hand back its record; later calls for it get 403."""
        opened = self._open.pop(rollout_id, None)
        if opened is None:
            raise KeyError(f"rollout {rollout_id!r} is not open")
        self._closed.add(rollout_id)
        return opened.record

    @staticmethod
    def _model_url(metadata: RolloutMetadata, base_url: str) -> str:
        ids = {name: quote(getattr(metadata, name), safe="") for name in ROLLOUT_IDS}
        return base_url.rstrip("/") + ROLLOUT_PATH.format(**ids)

    # --- HTTP -------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="openrft gateway")
        install_error_handlers(app)

        # 200: JSON, or server-sent chunks when the request asks for stream=true
        event = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
        streamed = {"description": "the completion", "content": {"text/event-stream": {"schema": event}}}
        @app.post(ROLLOUT_PATH + "/chat/completions",
                  responses={200: streamed, 400: OPENAI_ERROR, 401: OPENAI_ERROR, 403: OPENAI_ERROR, 404: OPENAI_ERROR},
                  openapi_extra=_json_body(ChatCompletionRequest))
        async def chat_completions(
            request: Request, rollout_id: str, invocation_id: str, experiment_id: str, run_id: str, row_id: str
        ) -> Response:
            return await self._chat_completions(request)

        serve_plain(app, ROLLOUT_PATH + "/chat/completions", self._chat_completions)

        @app.get(ROLLOUT_PATH + "/models", responses={401: OPENAI_ERROR, 403: OPENAI_ERROR, 404: OPENAI_ERROR})
        async def rollout_models(
            request: Request, rollout_id: str, invocation_id: str, experiment_id: str, run_id: str, row_id: str
        ) -> dict[str, Any]:
            self._authorize(request, request.path_params)
            return self.completer.models_response()

        @app.post("/logs", responses={400: OPENAI_ERROR, 403: OPENAI_ERROR, 404: OPENAI_ERROR}, openapi_extra=_json_body(LogRecordBody))
        @app.post("/v1/logs", responses={400: OPENAI_ERROR, 403: OPENAI_ERROR, 404: OPENAI_ERROR}, openapi_extra=_json_body(LogRecordBody))
        async def logs(request: Request) -> dict[str, Any]:
            return self._accept_log(await read_json(request), request.headers.get("authorization", ""))

        # eval-protocol's read-out of what was pushed (statuses, not conversations: those are the trainer's)
        add_tracing_routes(app, self.traces, lambda request: None, traces=False)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return self.completer.models_response()

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "open_rollouts": len(self._open)}

        return app

    async def _chat_completions(self, request: Request) -> Response:
        opened = self._authorize(request, request.path_params)
        started_ns = time.time_ns()
        completion = await self.completer.complete(await read_json(request))
        traces.model_call(request.headers.get("traceparent"), request.path_params["rollout_id"],
                           prompt_tokens=len(completion.prompt_ids), start_ns=started_ns, end_ns=time.time_ns(),
                           completion_tokens=sum(len(c.completion_ids) for c in completion.choices))
        if self._open.get(request.path_params["rollout_id"]) is opened:  # not closed while generating
            self._record(opened, completion)
        return completion_response(completion)

    def _authorize(self, request: Request, path_ids: dict[str, str]) -> _Open:
        rid = path_ids["rollout_id"]
        opened = self._open.get(rid)
        if opened is None:
            if rid in self._closed:
                raise APIError(403, f"rollout {rid!r} is finished; no more completions", type_="permission_error", code="rollout_closed")
            raise APIError(404, f"unknown rollout {rid!r}", type_="not_found_error", code="rollout_not_found")
        metadata = opened.record.metadata
        wrong = [name for name in ROLLOUT_IDS if getattr(metadata, name) != path_ids[name]]
        if wrong:
            raise APIError(404, f"no rollout {rid!r} with that {wrong[0]}", type_="not_found_error", code="rollout_not_found")
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing 'Authorization: Bearer <api_key>' header", type_="authentication_error", code="invalid_api_key")
        if not secrets.compare_digest(key.strip(), opened.record.api_key):
            raise APIError(403, f"this API key is not valid for rollout {rid!r}", type_="permission_error", code="invalid_api_key")
        return opened

    @staticmethod
    def _record(opened: _Open, completion: Completion) -> None:
        record = opened.record
        prompt = completion.prompt_ids
        if opened.last_calls and not any(extends(prompt, c.prompt_ids + c.completion_ids) for c in opened.last_calls):
            record.prefix_mismatch = True
        calls = [
            CallRecord(
                messages=completion.messages,
                tools=completion.tools,
                prompt_ids=list(prompt),
                completion_ids=choice.completion_ids,
                logprobs=choice.logprobs,
                response=choice.message,
                finish_reason=choice.finish_reason,
                policy_version=choice.policy_version,
                tool_call_errors=choice.tool_call_errors,
            )
            for choice in completion.choices
        ]
        record.calls.extend(calls)
        opened.last_calls = calls

    def _accept_log(self, body: Any, authorization: str = "") -> dict[str, Any]:
        log = parse_log_record(body)
        rids = log.rollout_ids()
        known = [rid for rid in rids if rid in self._open]
        if not known:
            raise APIError(404, f"unknown or closed rollout {rids[0]!r}", type_="not_found_error", code="rollout_not_found")
        # No key is required here (eval-protocol sends whatever FIREWORKS_API_KEY holds), but a
        # rollout's own key may only speak for that rollout: one env cannot end another's.
        key = authorization.partition(" ")[2].strip()
        owner = next((rid for rid, o in self._open.items() if key and secrets.compare_digest(o.record.api_key, key)), None)
        if owner is not None and any(rid != owner for rid in known):
            raise APIError(403, f"this API key is not valid for rollout {next(r for r in known if r != owner)!r}",
                           type_="permission_error", code="invalid_api_key")
        self.traces.add_log(log, known)
        terminal = log.status is not None and log.status.code != StatusCode.RUNNING
        if terminal:
            for rid in known:
                self._finish(self._open[rid], log.status)
        return {"status": "ok", "rollouts": known, "terminal": terminal}

    @staticmethod
    def _finish(opened: _Open, status: Status | None) -> None:
        record = opened.record
        if record.logged_status is None:
            record.logged_status = status
        loop = opened.loop
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or loop is current or loop.is_closed():
            record.logged.set()
        else:
            loop.call_soon_threadsafe(record.logged.set)
