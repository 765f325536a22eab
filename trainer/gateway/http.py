"""HTTP plumbing of the OpenAI-compatible apps (the gateway, `openrft serve`): errors in OpenAI's
shape, JSON bodies read by the routes themselves, and routes served without FastAPI's dependency
solving."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

M = TypeVar("M", bound=BaseModel)


#: Every error answer, in OpenAI's shape (documented in the OpenAPI so clients and fuzzers know it).
OPENAI_ERROR: dict[str, Any] = {"description": "OpenAI-style error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}}}}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.param, self.type, self.code = status_code, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def as_api_error(exc: Exception) -> APIError:
    """`exc` as an APIError; anything unexpected (the backend ran out of memory) is a 500, which clients retry."""
    if isinstance(exc, APIError):
        return exc
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error")


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style bodies for our errors, FastAPI's own request validation, and anything else (500)."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_api_error(exc.errors()).response()

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def validation_api_error(errors: Any) -> APIError:
    first = list(errors)[0]
    path = ""
    for part in first.get("loc", ()):
        if part != "body":
            path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    param = path or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)


def parse_body(model: type[M], body: Any, what: str) -> M:
    """`body` (parsed JSON) as `model`, or an APIError (400) naming the field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, f"{what} must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_api_error(exc.errors()) from None


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None


def serve_plain(app: FastAPI, path: str, handle: Callable[[Request], Awaitable[Response]]) -> None:
    """Serve the route at `path` by calling `handle` on the request, skipping FastAPI's dependency
    solving (~100 us of a ~200 us request on the tiny model). The route's own endpoint only takes
    the path ids and calls `handle` too, so the OpenAPI document, built from it, is unchanged, and
    so are the errors: `handle` raises the APIErrors that the app's handlers answer."""
    route = next(r for r in app.router.routes if isinstance(r, APIRoute) and r.path == path)

    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        response = await handle(Request(scope, receive))
        await response(scope, receive, send)

    route.app = plain
