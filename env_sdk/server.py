"""Turn an agent function into a protocol-v1 env server (a FastAPI app).

The agent is an async function `agent(task, client)` that receives the rollout's task and an
`openai.AsyncOpenAI` already pointed at the trainer's `model_base_url` with the rollout's
`api_key`. It returns an `AgentResult`, a float reward, or None (the trainer scores).

`POST /init` answers 202 at once; each rollout then runs as an asyncio task under a
concurrency limit and a deadline (`env_sdk._lifecycle`). The endpoints are the methods of
`_Routes`: FastAPI serves them (and builds the OpenAPI document from them), and the hot ones also
have a fast path that `env_sdk._asgi` answers before FastAPI. See protocol/SPEC.md for the wire
contract.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from env_sdk._asgi import FastHandler, ProtocolMiddleware, field_errors, json_error
from env_sdk._lifecycle import MISSING_MODEL_URL, RETRY_AFTER_S, EnvServer
from env_sdk.agent import Agent, AgentResult, RolloutTask
from env_sdk.models import (
    CAP_INIT_BATCH,
    INIT_BATCH_MAX,
    OPEN_PATHS,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    CancelResponse,
    ErrorResponse,
    Health,
    InitBatchRequest,
    InitBatchResponse,
    InitRequest,
    InitResponse,
    StatusBatchRequest,
    StatusBatchResponse,
    StatusResponse,
    VersionResponse,
)
from env_sdk.status_push import StatusPusher, resolve_tracing_url

__all__ = [  # noqa: RUF022 - what this module always offered; the constants live where they are used
    "create_env_app",
    "SDK_VERSION",
    "Agent",
    "AgentResult",
    "RolloutTask",
    "MISSING_MODEL_URL",
    "OPEN_PATHS",
    "PROTOCOL_HEADER",
    "RETRY_AFTER_S",
]

SDK_VERSION = "openrft-env-sdk/0.1.0"

#: wait_s values the /status fast path reads itself (what EnvClient sends); others take FastAPI's path.
_PLAIN_WAIT_S = re.compile(r"\d{1,2}(\.\d{1,6})?")
_ERR = {"model": ErrorResponse}


def _item_rollout_id(item: Any) -> str | None:
    """metadata.rollout_id of a raw /init/batch item, when it has a string one."""
    metadata = item.get("metadata") if isinstance(item, dict) else None
    rid = metadata.get("rollout_id") if isinstance(metadata, dict) else None
    return rid if isinstance(rid, str) else None


def _unknown(rollout_id: str) -> JSONResponse:
    return json_error(404, f"unknown rollout_id {rollout_id!r} (never started, or its result expired)")


async def _json_body(request: Request) -> bytes | None:
    """The body a fast path may parse; None (FastAPI's path answers) when empty or not JSON."""
    body = await request.body()
    if not body or request.headers.get("content-type") not in (None, "application/json"):
        return None
    return body


class _Routes:
    """The endpoints of one env server over its rollouts. The route methods are what FastAPI serves
    and documents (their names and docstrings are the OpenAPI document's); the `*_fast` methods
    answer the same well-formed requests from the ASGI layer, and None for anything else."""

    def __init__(self, server: EnvServer, name: str) -> None:
        self.server = server
        self.name = name

    def mount(self, app: FastAPI) -> None:
        app.post("/init", status_code=202, response_model=InitResponse,
                 responses={200: {"model": InitResponse, "description": "duplicate rollout_id: already started"},
                            400: _ERR, 401: _ERR, 413: _ERR, 422: _ERR, 429: _ERR, 503: _ERR})(self.init)
        app.post("/init/batch", response_model=InitBatchResponse,
                 responses={400: _ERR, 401: _ERR, 413: _ERR, 422: _ERR})(self.init_batch)
        app.get("/status", response_model=StatusResponse, responses={401: _ERR, 404: _ERR, 422: _ERR})(self.status)
        app.post("/status/batch", response_model=StatusBatchResponse,
                 responses={400: _ERR, 401: _ERR, 413: _ERR, 422: _ERR})(self.status_batch)
        app.post("/cancel", response_model=CancelResponse, responses={401: _ERR, 404: _ERR, 422: _ERR})(self.cancel)
        app.get("/health", response_model=Health)(self.health)
        app.get("/version", response_model=VersionResponse)(self.version)

    def fast_paths(self) -> dict[tuple[str, str], FastHandler]:
        return {("POST", "/init"): self.init_fast, ("POST", "/init/batch"): self.init_batch_fast,
                ("GET", "/status"): self.status_fast}

    # --- the routes -----------------------------------------------------------------------

    async def init(self, req: InitRequest) -> Response:
        """Start one rollout and answer at once (202). A rollout_id the server already holds
        answers 200 and starts nothing. 429 + Retry-After at capacity."""
        return self._init(req)

    async def init_batch(self, req: InitBatchRequest) -> Response:
        """Optional (capability `init_batch`): start many rollouts in one request. Each item gets what
        its own `POST /init` would have answered (202, 200, 422, 429, 503), in order; the request as a
        whole fails only for what fails every item (body not JSON, token, size)."""
        return self._init_batch(req.requests)

    async def status(
        self,
        rollout_id: str = Query(min_length=1),
        wait_s: float = Query(0.0, ge=0, le=60, description="long-poll: wait up to wait_s for a terminal state"),
    ) -> Response:
        """The rollout's status; with wait_s > 0 the answer waits until it is terminal or wait_s passed."""
        return await self._status(rollout_id, wait_s)

    async def status_batch(self, req: StatusBatchRequest) -> Response:
        """The terminal rollouts among rollout_ids. With wait_s > 0 and none terminal yet, waits until
        one is (then gathers more for linger_s) or wait_s passed. Ids never seen are listed in `unknown`."""
        done, unknown = await self.server.settled(list(dict.fromkeys(req.rollout_ids)), req.wait_s, req.linger_s)
        parts = b",".join(json.dumps(r.rollout_id).encode() + b":" + r.body for r in done)
        body = b'{"statuses":{' + parts + b'},"unknown":' + json.dumps(unknown).encode() + b"}"
        return Response(body, media_type="application/json")

    async def cancel(self, rollout_id: str = Query(min_length=1)) -> Response:
        """Stop a running rollout (its status becomes CANCELLED); a terminal one is left as it is."""
        stopped = await self.server.cancel(rollout_id)
        if stopped is None:
            return _unknown(rollout_id)
        return JSONResponse(CancelResponse(rollout_id=rollout_id, cancelled=stopped).model_dump())

    async def health(self) -> Health:
        """Liveness and capacity; needs no token."""
        s = self.server
        return Health(status="draining" if s.draining else "ok", capacity=s.max_concurrency,
                      in_flight=s.running, available=max(s.max_concurrency - s.running, 0))

    async def version(self) -> VersionResponse:
        """Protocol version and server name; needs no token."""
        return VersionResponse(name=self.name, sdk=SDK_VERSION, capabilities=[CAP_INIT_BATCH])

    # --- the fast paths -------------------------------------------------------------------

    async def init_fast(self, request: Request) -> Response | None:
        if (body := await _json_body(request)) is None:
            return None
        try:
            req = InitRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError: FastAPI's path names the fields
            return None
        return self._init(req)

    async def init_batch_fast(self, request: Request) -> Response | None:
        """Items stay raw here: each is validated on its own in `_init_batch`."""
        if (body := await _json_body(request)) is None:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        items = data.get("requests") if isinstance(data, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= INIT_BATCH_MAX:
            return None  # FastAPI's path names what is wrong with the request as a whole
        return self._init_batch(items)

    async def status_fast(self, request: Request) -> Response | None:
        query = request.query_params
        rollout_id = query.get("rollout_id")
        wait_s = query.get("wait_s", "0")
        if not rollout_id or not _PLAIN_WAIT_S.fullmatch(wait_s) or float(wait_s) > 60:
            return None
        return await self._status(rollout_id, float(wait_s))

    # --- shared by both -------------------------------------------------------------------

    def _init(self, req: InitRequest) -> Response:
        code, refused = self.server.admit(req)
        if refused is not None:
            return json_error(code, refused, headers={"Retry-After": str(RETRY_AFTER_S)})
        body = b'{"status":"accepted","rollout_id":' + json.dumps(req.metadata.rollout_id).encode() + b"}"
        return Response(body, status_code=code, media_type="application/json")

    def _init_batch(self, items: Sequence[Any]) -> Response:
        """Each item validated and admitted on its own, in order: what its own `/init` would answer."""
        results: list[dict[str, Any]] = []
        for item in items:
            try:
                req = InitRequest.model_validate(item)
            except ValidationError as exc:
                code, detail, errors = field_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
                results.append({"status_code": code, "rollout_id": _item_rollout_id(item), "detail": detail,
                                "errors": errors})
                continue
            code, refused = self.server.admit(req)
            result: dict[str, Any] = {"status_code": code, "rollout_id": req.metadata.rollout_id}
            if refused is not None:
                result.update(detail=refused, retry_after=float(RETRY_AFTER_S))
            results.append(result)
        return Response(json.dumps({"results": results}).encode(), media_type="application/json")

    async def _status(self, rollout_id: str, wait_s: float) -> Response:
        body = await self.server.status_body(rollout_id, wait_s)
        if body is None:
            return _unknown(rollout_id)
        return Response(body, media_type="application/json")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The import graph (~150k objects) never becomes garbage: keep full collections off it.
    gc.freeze()
    yield
    await app.state.env_server.aclose()


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    status_code, detail, errors = field_errors(exc.errors())
    return json_error(status_code, detail, errors)


async def _on_http_error(request: Request, exc: HTTPException) -> Response:
    return json_error(exc.status_code, str(exc.detail), headers=exc.headers)


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
    server = EnvServer(agent, max_concurrency=max_concurrency, deadline_s=deadline_s, result_ttl_s=result_ttl_s,
                       pusher=StatusPusher(gateway) if gateway else None)
    routes = _Routes(server, name)
    # strict_content_type=False: a JSON body without a Content-Type header (curl -d, bare clients) is read as JSON.
    app = FastAPI(title=f"openrft env server: {name}", version=PROTOCOL_VERSION, lifespan=_lifespan,
                  description="Protocol v1 (see protocol/SPEC.md).", strict_content_type=False)
    app.state.env_server = server
    app.add_middleware(ProtocolMiddleware, token=token, max_body_bytes=max_body_bytes, fast=routes.fast_paths())
    app.exception_handler(RequestValidationError)(_on_validation_error)
    app.exception_handler(HTTPException)(_on_http_error)
    routes.mount(app)
    return app
