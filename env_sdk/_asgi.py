"""The env server's pure-ASGI layer, in front of FastAPI: the protocol header on every answer, the
bearer-token check, the request body cap, and the hot routes answered before FastAPI sees them.
Also the error bodies both this layer and FastAPI's handlers answer with."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from env_sdk.models import (
    OPEN_PATHS,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ErrorResponse,
    FieldError,
)

#: A fast path: the answer to a well-formed request, or None to leave the request to FastAPI.
FastHandler = Callable[[Request], Awaitable[Response | None]]

_HEADER = (PROTOCOL_HEADER.lower().encode(), PROTOCOL_VERSION.encode())


def json_error(status_code: int, detail: str, errors: list[dict[str, str]] | None = None,
               headers: Mapping[str, str] | None = None) -> JSONResponse:
    fields = [FieldError(**e) for e in errors] if errors else None
    body = ErrorResponse(detail=detail, errors=fields).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


def field_errors(validation_errors: Sequence[Mapping[str, Any]]) -> tuple[int, str, list[dict[str, str]]]:
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


class ProtocolMiddleware:
    """Pure ASGI: protocol header on every answer, bearer-token check, request body size cap, and
    the hot routes served straight from here.

    `fast` maps (method, path) to a plain function of the request that answers a well-formed
    request itself, skipping FastAPI's exception layers, routing and dependency solving (61 us
    against 27 us a request for the dependency solving alone). It answers None for anything
    else; the request then goes on through FastAPI with the same body, so error answers (and the
    OpenAPI document, built from the routes) are exactly FastAPI's."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int,
                 fast: Mapping[tuple[str, str], FastHandler]) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), _HEADER]
            await send(message)

        headers = dict(scope.get("headers") or ())
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, credential = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), self.token):
                reason = "missing" if not given else "wrong"
                resp = json_error(401, f"{reason} bearer token (Authorization: Bearer <token>)",
                                  headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_with_header)
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            resp = json_error(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}")
            await resp(scope, receive, send_with_header)
            return

        received = 0

        async def capped_receive() -> Message:
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
            response = json_error(exc.status_code, str(exc.detail), headers=exc.headers)
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
                return await capped_receive()
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body = None
            return message

        await self.app(scope, receive_again, send_with_header)
