"""Turn an agent function into a protocol-v1 env server (a FastAPI app).

The agent is an async function `agent(task, client)` that receives the rollout's task and an
`openai.AsyncOpenAI` already pointed at the trainer's `model_base_url` with the rollout's
`api_key`. It returns an `AgentResult`, a float reward, or None (the trainer scores).

`POST /init` answers 202 at once; each rollout then runs as an asyncio task under a
concurrency limit and a deadline. See protocol/SPEC.md for the wire contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import math
import re
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import openai
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import Message

from env_sdk.status_push import StatusPusher, resolve_tracing_url, status_record
from env_sdk.models import (
    CAP_INIT_BATCH,
    INIT_BATCH_MAX,
    PROTOCOL_VERSION,
    CancelResponse,
    ErrorResponse,
    FieldError,
    Health,
    InitBatchRequest,
    InitBatchResponse,
    InitRequest,
    InitResponse,
    RolloutMetadata,
    Status,
    StatusBatchRequest,
    StatusBatchResponse,
    StatusCode,
    StatusResponse,
    VersionResponse,
)

logger = logging.getLogger("env_sdk.server")

SDK_VERSION = "openrft-env-sdk/0.1.0"
PROTOCOL_HEADER = "X-OpenRFT-Protocol"
#: Endpoints answered without the bearer token (probes of load balancers; they reveal no rollout).
OPEN_PATHS = frozenset({"/health", "/version"})
#: Placeholder base URL when an InitRequest has no model_base_url: model calls then fail with a
#: connection error whose message names the missing field.
MISSING_MODEL_URL = "http://model-base-url-missing.invalid/v1"

# Parameters `chat.completions.create` takes as keyword arguments; other completion_params go
# to the server in `extra_body` (e.g. vLLM's top_k).
_OPENAI_CHAT_PARAMS = frozenset(
    {
        "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "n",
        "parallel_tool_calls", "presence_penalty", "reasoning_effort", "response_format", "seed",
        "stop", "temperature", "tool_choice", "top_logprobs", "top_p", "user", "metadata",
    }
)  # fmt: skip


@dataclass
class RolloutTask:
    """What an agent function receives for one rollout."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    metadata: RolloutMetadata
    completion_params: dict[str, Any]
    task_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.completion_params.get("model", "policy"))

    def completion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.chat.completions.create(**kwargs, messages=...)`:
        the model plus completion_params, unknown ones moved into `extra_body`."""
        kwargs: dict[str, Any] = {"model": self.model}
        extra: dict[str, Any] = dict(self.completion_params.get("extra_body") or {})
        for key, value in self.completion_params.items():
            if key in ("model", "extra_body"):
                continue
            if key in _OPENAI_CHAT_PARAMS:
                kwargs[key] = value
            else:
                extra[key] = value
        if extra:
            kwargs["extra_body"] = extra
        return kwargs


@dataclass
class AgentResult:
    reward: float | None = None
    messages: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    termination_reason: str | None = None


Agent = Callable[[RolloutTask, openai.AsyncOpenAI], Awaitable[AgentResult | float | None]]


@dataclass
class _Rollout:
    rollout_id: str
    request: InitRequest
    deadline_s: float
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    body: bytes = b""  # the terminal StatusResponse as JSON, set once
    cancel_requested: bool = False


#: What a refused /init (429 at capacity, 503 draining) tells the client to wait, in seconds.
RETRY_AFTER_S = 1


def _json_error(status_code: int, detail: str, errors: list[dict[str, str]] | None = None,
                headers: Mapping[str, str] | None = None) -> JSONResponse:
    fields = [FieldError(**e) for e in errors] if errors else None
    body = ErrorResponse(detail=detail, errors=fields).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


def _field_errors(validation_errors: Sequence[Mapping[str, Any]]) -> tuple[int, str, list[dict[str, str]]]:
    """Compact, field-named errors from FastAPI's validation errors, locations starting with where
    ("body", "query"): 400 for unparseable JSON, else 422."""
    errors: list[dict[str, str]] = []
    status_code = 422
    for err in validation_errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc else "body"
        path = ".".join(loc[1:])
        if err.get("type") == "json_invalid":
            status_code = 400
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            errors.append({"field": "body", "message": f"malformed JSON at position {path or '?'}: {reason}"})
            continue
        name = path or where
        if not path and where == "body" and err.get("type") == "missing":
            errors.append({"field": "body", "message": "body: required, a JSON object"})
            continue
        if not path and where == "body" and err.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            errors.append({"field": "body", "message": "body: must be a JSON object (Content-Type: application/json)"})
            continue
        if where == "query" or where == "path":
            name = f"{path} ({where} parameter)"
        errors.append({"field": path or where, "message": f"{name}: {err.get('msg', 'invalid')}"})
    detail = "; ".join(e["message"] for e in errors) or "invalid request"
    return status_code, detail, errors


def _item_rollout_id(item: Any) -> str | None:
    """metadata.rollout_id of a raw /init/batch item, when it has a string one."""
    metadata = item.get("metadata") if isinstance(item, dict) else None
    rid = metadata.get("rollout_id") if isinstance(metadata, dict) else None
    return rid if isinstance(rid, str) else None


class _LazyModelClient:
    """Stands in for a rollout's `openai.AsyncOpenAI` and builds it on first use: building one
    costs 25-90 us of httpx URL parsing and leaves cyclic garbage, and many agents (scoring only,
    no-op) never call the model."""

    __slots__ = ("_lazy_client", "_lazy_request", "_lazy_server")

    def __init__(self, server: _EnvServer, request: InitRequest) -> None:
        self._lazy_server = server
        self._lazy_request = request
        self._lazy_client: openai.AsyncOpenAI | None = None

    def _lazy_get(self) -> openai.AsyncOpenAI:
        if self._lazy_client is None:
            self._lazy_client = self._lazy_server.model_client(self._lazy_request)
        return self._lazy_client

    def __getattr__(self, name: str) -> Any:  # only called for names the proxy itself lacks
        return getattr(self._lazy_get(), name)

    async def __aenter__(self) -> openai.AsyncOpenAI:
        return await self._lazy_get().__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._lazy_get().__aexit__(*exc_info)  # type: ignore[arg-type]


#: wait_s values the /status fast path reads itself (what EnvClient sends); others take FastAPI's path.
_PLAIN_WAIT_S = re.compile(r"\d{1,2}(\.\d{1,6})?")


FastHandler = Callable[[Request], Awaitable[Response | None]]


class _ProtocolMiddleware:
    """Pure ASGI: protocol header on every answer, bearer-token check, request body size cap, and
    the hot routes served straight from here.

    `fast` maps (method, path) to a plain function of the request that answers a well-formed
    request itself, skipping FastAPI's exception layers, routing and dependency solving (61 us
    against 27 us a request for the dependency solving alone). It answers None for anything
    else; the request then goes on through FastAPI with the same body, so error answers (and the
    OpenAPI document, built from the routes) are exactly FastAPI's."""

    def __init__(self, app: Any, *, token: str | None, max_body_bytes: int,
                 fast: Mapping[tuple[str, str], FastHandler]) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.fast = fast

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-openrft-protocol", PROTOCOL_VERSION.encode())]
            await send(message)

        headers = dict(scope.get("headers") or ())
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, credential = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), self.token):
                reason = "missing" if not given else "wrong"
                resp = _json_error(401, f"{reason} bearer token (Authorization: Bearer <token>)",
                                   headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_with_header)
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            resp = _json_error(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}")
            await resp(scope, receive, send_with_header)
            return

        received = 0

        async def capped_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException, so FastAPI's body parsing passes it through as 413.
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            return message

        root, path = scope.get("root_path", ""), scope["path"]
        handle = self.fast.get((scope["method"], path[len(root):] if root and path.startswith(root) else path))
        if handle is None:
            await self.app(scope, capped_receive, send_with_header)
            return
        request = Request(scope, capped_receive)
        try:
            response = await handle(request)
        except HTTPException as exc:  # the body cap, met while reading
            response = _json_error(exc.status_code, str(exc.detail), headers=exc.headers)
        if response is not None:
            await response(scope, capped_receive, send_with_header)
            return
        if not hasattr(request, "_body"):
            await self.app(scope, capped_receive, send_with_header)
            return
        body: bytes | None = request._body  # the body was read: hand it on once more

        async def receive_again() -> Message:
            nonlocal body
            if body is None:
                return await capped_receive()  # type: ignore[return-value]
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body = None
            return message

        await self.app(scope, receive_again, send_with_header)


def _check_reward(reward: Any) -> str | None:
    """None when `reward` is a valid score, else why not."""
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        return f"reward must be a float in [0, 1], got {type(reward).__name__} {reward!r}"
    if math.isnan(reward) or not 0.0 <= reward <= 1.0:
        return f"reward must be within [0, 1], got {reward!r}"
    return None


def _result_status(result: Any) -> StatusResponse:
    """The terminal StatusResponse for what the agent returned."""
    if result is None or (isinstance(result, (int, float)) and not isinstance(result, bool)):
        result = AgentResult(reward=result)
    if not isinstance(result, AgentResult):
        return StatusResponse(
            terminated=True,
            status=Status.error(StatusCode.INTERNAL,
                                f"agent returned {type(result).__name__}; expected AgentResult, float or None"),
            info={},
        )
    if result.reward is not None and (why := _check_reward(result.reward)) is not None:
        return StatusResponse(
            terminated=True, status=Status.error(StatusCode.SCORE_INVALID, why), info=result.info,
            metrics=result.metrics or None, termination_reason=result.termination_reason,
            messages=result.messages,  # type: ignore[arg-type]
        )
    return StatusResponse(
        terminated=True,
        status=Status.finished(),
        info=result.info,
        reward=None if result.reward is None else float(result.reward),
        metrics=result.metrics or None,
        termination_reason=result.termination_reason,
        messages=result.messages,  # type: ignore[arg-type]
    )


class _EnvServer:
    def __init__(self, agent: Agent, *, max_concurrency: int, deadline_s: float, result_ttl_s: float,
                 name: str, pusher: StatusPusher | None = None) -> None:
        self.agent = agent
        self.pusher = pusher
        self.max_concurrency = max_concurrency
        self.deadline_s = deadline_s
        self.result_ttl_s = result_ttl_s
        self.name = name
        self.rollouts: dict[str, _Rollout] = {}
        self.running = 0
        self.draining = False
        # Batch long-polls waiting for any of their ids to finish: future -> ids.
        self.waiters: dict[asyncio.Future[None], frozenset[str]] = {}
        self._http: httpx.AsyncClient | None = None

    # --- model client ---------------------------------------------------------------------

    def http(self) -> httpx.AsyncClient:
        """One pooled connection set shared by every rollout's OpenAI client."""
        if self._http is None:
            limits = httpx.Limits(max_connections=max(self.max_concurrency, 16),
                                  max_keepalive_connections=max(self.max_concurrency, 16))
            self._http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))
        return self._http

    def model_client(self, req: InitRequest) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=req.model_base_url or MISSING_MODEL_URL,
            api_key=req.api_key or "EMPTY",
            http_client=self.http(),
        )

    async def aclose(self) -> None:
        self.draining = True
        tasks = [r.task for r in self.rollouts.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.pusher is not None:
            await self.pusher.aclose()

    # --- rollouts -------------------------------------------------------------------------

    def start(self, req: InitRequest) -> _Rollout:
        rid = req.metadata.rollout_id
        r = _Rollout(rollout_id=rid, request=req, deadline_s=req.deadline_s or self.deadline_s)
        self.rollouts[rid] = r
        self.running += 1
        r.task = asyncio.create_task(self._run(r), name=f"rollout-{rid}")
        logger.info("rollout %s started (deadline %.1fs)", rid, r.deadline_s)
        return r

    async def _run(self, r: _Rollout) -> None:
        req = r.request
        timeout = asyncio.timeout(r.deadline_s)
        try:
            task = RolloutTask(
                messages=[m.model_dump(exclude_none=True) for m in req.messages or ()],
                tools=req.tools,
                metadata=req.metadata,
                completion_params=dict(req.completion_params),
                task_metadata=dict(req.task_metadata or {}),
            )
            async with timeout:
                result = await self.agent(task, cast(openai.AsyncOpenAI, _LazyModelClient(self, req)))
            status = _result_status(result)
        except asyncio.CancelledError:
            if not r.cancel_requested:
                self._finish(r, StatusResponse(terminated=True, info={},
                                               status=Status.error(StatusCode.UNAVAILABLE, "env server shutting down")))
                raise
            status = StatusResponse(terminated=True, info={},
                                    status=Status.error(StatusCode.CANCELLED, "cancelled by the client"))
        except TimeoutError as exc:
            if not timeout.expired():
                status = self._crash(r, exc)
            else:
                status = StatusResponse(terminated=True, info={}, status=Status.error(
                    StatusCode.DEADLINE_EXCEEDED, f"rollout exceeded its deadline of {r.deadline_s:g}s"))
        except (Exception, SystemExit) as exc:  # sys.exit() in an agent or tool ends its rollout, not the server
            status = self._crash(r, exc)
        if r.cancel_requested and status.status is not None and status.status.code != StatusCode.CANCELLED:
            status = StatusResponse(terminated=True, info={},
                                    status=Status.error(StatusCode.CANCELLED, "cancelled by the client"))
        self._finish(r, status)

    def _crash(self, r: _Rollout, exc: BaseException) -> StatusResponse:
        logger.error("rollout %s: agent raised %s: %s", r.rollout_id, type(exc).__name__, exc, exc_info=exc)
        return StatusResponse(terminated=True, info={"exception": type(exc).__name__},
                              status=Status.error(StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _finish(self, r: _Rollout, status: StatusResponse) -> None:
        if r.done.is_set():
            return
        try:
            r.body = status.model_dump_json(exclude_none=True).encode()
        except ValueError as exc:  # e.g. a metric that does not serialise
            r.body = StatusResponse(terminated=True, info={}, status=Status.error(
                StatusCode.INTERNAL, f"agent result is not serialisable: {exc}")).model_dump_json().encode()
        r.done.set()
        self.running -= 1
        if self.pusher is not None:
            self.pusher.push(status_record(r.request, status, logger_name=logger.name), r.request.api_key)
        elapsed = time.monotonic() - r.started
        code = status.status.code if status.status else None
        logger.info("rollout %s finished: code=%s reward=%s in %.3fs", r.rollout_id, code, status.reward, elapsed)
        for fut, ids in self.waiters.items():
            if r.rollout_id in ids and not fut.done():
                fut.set_result(None)
        asyncio.get_running_loop().call_later(self.result_ttl_s, self._evict, r)

    def _evict(self, r: _Rollout) -> None:
        if self.rollouts.get(r.rollout_id) is r:
            del self.rollouts[r.rollout_id]

    async def wait_any(self, ids: frozenset[str], wait_s: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[fut] = ids
        try:
            await asyncio.wait_for(fut, wait_s)
        except TimeoutError:
            pass
        finally:
            del self.waiters[fut]


_RUNNING_BODY = StatusResponse(terminated=False, status=Status.running(), info={}).model_dump_json(
    exclude_none=True
).encode()


def create_env_app(
    agent: Agent,
    *,
    max_concurrency: int = 256,
    deadline_s: float = 300.0,
    token: str | None = None,
    result_ttl_s: float = 600.0,
    name: str = "env",
    max_body_bytes: int = 4 * 1024 * 1024,
    tracing_url: str | None = None,
) -> FastAPI:
    """A protocol-v1 env server running `agent` for each `POST /init`.

    max_concurrency: rollouts running at once; `/init` beyond it answers 429 + Retry-After.
    deadline_s: default per-rollout deadline (InitRequest.deadline_s overrides it).
    token: when set, every endpoint but /health and /version needs `Authorization: Bearer <token>`.
    result_ttl_s: how long a finished rollout's status stays readable (then 404).
    tracing_url: a tracing gateway that each finished rollout's status is also pushed to, as an
    eval-protocol log record (`POST {tracing_url}/logs`), for clients that read status there
    (eval-protocol's RemoteRolloutProcessor); default $FW_TRACING_GATEWAY_BASE_URL, else off.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    gateway = resolve_tracing_url(tracing_url)
    server = _EnvServer(agent, max_concurrency=max_concurrency, deadline_s=deadline_s,
                        result_ttl_s=result_ttl_s, name=name,
                        pusher=StatusPusher(gateway) if gateway else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The import graph (~150k objects) never becomes garbage: keep full collections off it.
        gc.freeze()
        yield
        await server.aclose()

    # strict_content_type=False: a JSON body without a Content-Type header (curl -d, bare clients) is read as JSON.
    app = FastAPI(title=f"openrft env server: {name}", version=PROTOCOL_VERSION, lifespan=lifespan,
                  description="Protocol v1 (see protocol/SPEC.md).", strict_content_type=False)
    app.state.env_server = server
    fast: dict[tuple[str, str], FastHandler] = {}  # filled below, once the handlers exist
    app.add_middleware(_ProtocolMiddleware, token=token, max_body_bytes=max_body_bytes, fast=fast)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status_code, detail, errors = _field_errors(exc.errors())
        return _json_error(status_code, detail, errors)

    @app.exception_handler(HTTPException)
    async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), headers=exc.headers)

    def _unknown(rollout_id: str) -> JSONResponse:
        return _json_error(404, f"unknown rollout_id {rollout_id!r} (never started, or its result expired)")

    err = {"model": ErrorResponse}

    @app.post("/init", status_code=202, response_model=InitResponse,
              responses={200: {"model": InitResponse, "description": "duplicate rollout_id: already started"},
                         400: err, 401: err, 413: err, 422: err, 429: err, 503: err})
    async def init(req: InitRequest) -> Response:
        """Start one rollout and answer at once (202). A rollout_id the server already holds
        answers 200 and starts nothing. 429 + Retry-After at capacity."""
        return _init(req)

    def _admit(req: InitRequest) -> tuple[int, str | None]:
        """What `/init` answers for a valid request: its status code and, for a refusal, why.
        Starts the rollout when the code is 202."""
        if req.metadata.rollout_id in server.rollouts:
            return 200, None
        if server.draining:
            return 503, "env server is shutting down"
        if server.running >= server.max_concurrency:
            return 429, f"at capacity: {server.running}/{server.max_concurrency} rollouts running"
        server.start(req)
        return 202, None

    def _init(req: InitRequest) -> Response:
        code, refused = _admit(req)
        if refused is not None:
            return _json_error(code, refused, headers={"Retry-After": str(RETRY_AFTER_S)})
        body = b'{"status":"accepted","rollout_id":' + json.dumps(req.metadata.rollout_id).encode() + b"}"
        return Response(body, status_code=code, media_type="application/json")

    def _init_batch(items: Sequence[Any]) -> Response:
        """Each item validated and admitted on its own, in order: what its own `/init` would answer."""
        results: list[dict[str, Any]] = []
        for item in items:
            try:
                req = InitRequest.model_validate(item)
            except ValidationError as exc:
                code, detail, errors = _field_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
                results.append({"status_code": code, "rollout_id": _item_rollout_id(item), "detail": detail,
                                "errors": errors})
                continue
            code, refused = _admit(req)
            result: dict[str, Any] = {"status_code": code, "rollout_id": req.metadata.rollout_id}
            if refused is not None:
                result.update(detail=refused, retry_after=float(RETRY_AFTER_S))
            results.append(result)
        return Response(json.dumps({"results": results}).encode(), media_type="application/json")

    @app.post("/init/batch", response_model=InitBatchResponse, responses={400: err, 401: err, 413: err, 422: err})
    async def init_batch(req: InitBatchRequest) -> Response:
        """Optional (capability `init_batch`): start many rollouts in one request. Each item gets what
        its own `POST /init` would have answered (202, 200, 422, 429, 503), in order; the request as a
        whole fails only for what fails every item (body not JSON, token, size)."""
        return _init_batch(req.requests)

    @app.get("/status", response_model=StatusResponse, responses={401: err, 404: err, 422: err})
    async def status(
        rollout_id: str = Query(min_length=1),
        wait_s: float = Query(0.0, ge=0, le=60, description="long-poll: wait up to wait_s for a terminal state"),
    ) -> Response:
        """The rollout's status; with wait_s > 0 the answer waits until it is terminal or wait_s passed."""
        return await _status(rollout_id, wait_s)

    async def _status(rollout_id: str, wait_s: float) -> Response:
        r = server.rollouts.get(rollout_id)
        if r is None:
            return _unknown(rollout_id)
        if wait_s > 0 and not r.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(r.done.wait(), wait_s)
        return Response(r.body if r.done.is_set() else _RUNNING_BODY, media_type="application/json")

    async def json_body(request: Request) -> bytes | None:
        """The body a fast path may parse; None (FastAPI's path answers) when empty or not JSON."""
        body = await request.body()
        if not body or request.headers.get("content-type") not in (None, "application/json"):
            return None
        return body

    async def init_fast(request: Request) -> Response | None:
        if (body := await json_body(request)) is None:
            return None
        try:
            req = InitRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError: FastAPI's path names the fields
            return None
        return _init(req)

    async def status_fast(request: Request) -> Response | None:
        query = request.query_params
        rollout_id = query.get("rollout_id")
        wait_s = query.get("wait_s", "0")
        if not rollout_id or not _PLAIN_WAIT_S.fullmatch(wait_s) or float(wait_s) > 60:
            return None
        return await _status(rollout_id, float(wait_s))

    async def init_batch_fast(request: Request) -> Response | None:
        """Items stay raw here: each is validated on its own in `_init_batch`."""
        if (body := await json_body(request)) is None:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        items = data.get("requests") if isinstance(data, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= INIT_BATCH_MAX:
            return None  # FastAPI's path names what is wrong with the request as a whole
        return _init_batch(items)

    fast.update({("POST", "/init"): init_fast, ("POST", "/init/batch"): init_batch_fast,
                 ("GET", "/status"): status_fast})

    @app.post("/status/batch", response_model=StatusBatchResponse, responses={400: err, 401: err, 413: err, 422: err})
    async def status_batch(req: StatusBatchRequest) -> Response:
        """The terminal rollouts among rollout_ids. With wait_s > 0 and none terminal yet, waits until
        one is (then gathers more for linger_s) or wait_s passed. Ids never seen are listed in `unknown`."""
        ids = list(dict.fromkeys(req.rollout_ids))

        def terminal() -> list[_Rollout]:
            return [r for i in ids if (r := server.rollouts.get(i)) is not None and r.done.is_set()]

        done = terminal()
        unknown = [i for i in ids if i not in server.rollouts]
        if not done and not unknown and req.wait_s > 0:
            t0 = time.monotonic()
            await server.wait_any(frozenset(ids), req.wait_s)
            linger = min(req.linger_s, req.wait_s - (time.monotonic() - t0))
            if linger > 0:  # a bounded gather window: one answer for a burst of finishes
                await asyncio.sleep(linger)
            done = terminal()
            unknown = [i for i in ids if i not in server.rollouts]
        parts = b",".join(json.dumps(r.rollout_id).encode() + b":" + r.body for r in done)
        body = b'{"statuses":{' + parts + b'},"unknown":' + json.dumps(unknown).encode() + b"}"
        return Response(body, media_type="application/json")

    @app.post("/cancel", response_model=CancelResponse, responses={401: err, 404: err, 422: err})
    async def cancel(rollout_id: str = Query(min_length=1)) -> Response:
        """Stop a running rollout (its status becomes CANCELLED); a terminal one is left as it is."""
        r = server.rollouts.get(rollout_id)
        if r is None:
            return _unknown(rollout_id)
        stopped = not r.done.is_set() and r.task is not None
        if stopped:
            r.cancel_requested = True
            assert r.task is not None
            r.task.cancel()
            # Let the agent unwind so /status reads CANCELLED right after this answer.
            await asyncio.wait({r.task}, timeout=5.0)
            logger.info("rollout %s cancelled by the client", rollout_id)
        return JSONResponse(CancelResponse(rollout_id=rollout_id, cancelled=stopped).model_dump())

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness and capacity; needs no token."""
        return Health(status="draining" if server.draining else "ok", capacity=server.max_concurrency,
                      in_flight=server.running, available=max(server.max_concurrency - server.running, 0))

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        """Protocol version and server name; needs no token."""
        return VersionResponse(name=name, sdk=SDK_VERSION, capabilities=[CAP_INIT_BATCH])

    return app
