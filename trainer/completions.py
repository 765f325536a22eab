"""The OpenAI chat-completions endpoint logic shared by the training gateway and `openrft serve`:
validate the request, render the prompt with the chat template, generate with a backend,
apply `stop` strings, parse tool calls, and build the OpenAI response.

Stop strings: generation runs until a stop token / eos / max_tokens (a stop string that is a
single token is also passed to the backend as a stop token id so generation ends there).
The returned text is cut before the earliest stop string (OpenAI semantics: the stop string
is not returned) and `finish_reason` is "stop". The completion tokens kept for training are
the shortest prefix of the sampled tokens whose text reaches the end of that stop string:
the tokens that produced it were sampled and are kept, anything sampled after it is dropped
(the env never saw it, so training never sees it either).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from env_sdk.models import Message, Tool
from trainer.backend import Generation, GenerationBackend, SamplingParams
from trainer.chat import ChatFormatError, parse_output, render_prompt


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.param, self.type, self.code = status_code, message, param, type_, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status_code)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style bodies for our errors, FastAPI's own request validation, and anything else (500)."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_api_error(exc.errors()).response()

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # e.g. the backend failed (out of memory): still an OpenAI-shaped body, which clients retry
        return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error").response()

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


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None


class ChatCompletionRequest(BaseModel):
    """The OpenAI request fields we act on; others (user, metadata, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=128)
    seed: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    logprobs: bool | None = None
    model: str | None = None


@dataclass
class ChoiceResult:
    """One generated choice with the exact tokens behind it."""

    completion_ids: list[int]
    logprobs: list[float]
    message: dict[str, Any]
    finish_reason: str


@dataclass
class Completion:
    request: ChatCompletionRequest
    messages: list[dict[str, Any]]  # as received
    tools: list[dict[str, Any]] | None
    prompt_ids: list[int]
    choices: list[ChoiceResult]
    response: dict[str, Any]  # the OpenAI response body


class ChatCompleter:
    """Turns a chat-completions request body into a Completion with the backend."""

    def __init__(self, backend: GenerationBackend, tokenizer: Any, *, model_name: str = "policy", default_max_tokens: int = 256, tool_parser: str = "hermes") -> None:
        parse_output("", tool_parser)  # fail now on an unknown parser name
        self.backend, self.tokenizer = backend, tokenizer
        self.model_name, self.default_max_tokens, self.tool_parser = model_name, default_max_tokens, tool_parser
        # A GRPO group's rollouts send the same messages: render (template + tokenize, ~40 us) once.
        self._render = functools.lru_cache(maxsize=4096)(self._render_uncached)

    def _render_uncached(self, key: str) -> tuple[int, ...]:
        """Prompt ids of the JSON `[messages, tools]`; a ChatFormatError is raised, not cached."""
        messages, tools = json.loads(key)
        return tuple(render_prompt(self.tokenizer, messages, tools))

    def parse_request(self, body: Any) -> ChatCompletionRequest:
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_api_error(exc.errors()) from None
        if request.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice: only 'auto' and 'none' are supported", param="tool_choice")
        return request

    def _sampling(self, request: ChatCompletionRequest, stop_ids: tuple[int, ...], index: int) -> SamplingParams:
        max_tokens = request.max_completion_tokens or request.max_tokens or self.default_max_tokens
        seed = None if request.seed is None else request.seed + index
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop_token_ids=stop_ids,
            seed=seed,
        )

    def _stop_strings(self, request: ChatCompletionRequest) -> list[str]:
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        return stops

    async def complete(self, body: Any) -> Completion:
        request = self.parse_request(body)
        messages: list[dict[str, Any]] = body["messages"]  # validated above; recorded as sent
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        try:
            prompt_ids = list(self._render(json.dumps([messages, tools])))
        except ChatFormatError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        stops = self._stop_strings(request)
        single = [self.tokenizer.encode(s, add_special_tokens=False) for s in stops]
        stop_ids = tuple(sorted({ids[0] for ids in single if len(ids) == 1}))
        try:
            generations = await asyncio.gather(
                *(self.backend.generate(prompt_ids, self._sampling(request, stop_ids, i)) for i in range(request.n))
            )
        except ValueError as exc:  # e.g. a prompt longer than the model's context
            raise APIError(400, f"messages: {exc}", param="messages") from None
        parse = request.tool_choice != "none" and bool(tools)
        choices = [self._choice(g, stops, parse) for g in generations]
        return Completion(request, messages, tools, prompt_ids, choices, self._response(prompt_ids, choices, bool(request.logprobs)))

    def _choice(self, gen: Generation, stops: list[str], parse_tools: bool) -> ChoiceResult:
        ids, logprobs, finish = list(gen.token_ids), list(gen.logprobs), gen.finish_reason
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at, stop = min(hits)
            end = at + len(stop)
            keep = next(k for k in range(1, len(ids) + 1) if len(self.tokenizer.decode(ids[:k], skip_special_tokens=True)) >= end)
            ids, logprobs, text, finish = ids[:keep], logprobs[:keep], text[:at], "stop"
        parsed = parse_output(text, self.tool_parser if parse_tools else "none")
        if parsed.tool_calls:
            finish = "tool_calls"
        return ChoiceResult(ids, logprobs, parsed.message(), finish)

    def _logprobs(self, choice: ChoiceResult) -> dict[str, Any]:
        """OpenAI's `logprobs.content`: each completion token with its recorded (temperature-1)
        logprob. `top_logprobs` stays empty: only the sampled token's logprob is kept."""
        content = []
        for token_id, logprob in zip(choice.completion_ids, choice.logprobs):
            token = self.tokenizer.decode([token_id])
            content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []})
        return {"content": content, "refusal": None}

    def _response(self, prompt_ids: list[int], choices: list[ChoiceResult], logprobs: bool = False) -> dict[str, Any]:
        completion_tokens = sum(len(c.completion_ids) for c in choices)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": i, "message": c.message, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c) if logprobs else None}
                for i, c in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens,
            },
        }

    def models_response(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "openrft"}]}


def completion_response(completion: Completion) -> Response:
    """The HTTP answer: the JSON body, or with `stream: true` the same completion as OpenAI's
    server-sent chunks (generated whole first, then sent: a client that streams works, it just
    sees the text arrive at once)."""
    if not completion.request.stream:
        return JSONResponse(completion.response)  # already JSON-ready: skip FastAPI's encoder
    options = completion.request.stream_options or {}
    return StreamingResponse(_sse(completion.response, bool(options.get("include_usage"))), media_type="text/event-stream")


def _sse(response: dict[str, Any], include_usage: bool) -> Iterator[str]:
    head = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"], "model": response["model"]}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    for choice in response["choices"]:
        index, message = choice["index"], choice["message"]
        delta = {"role": "assistant", "content": message["content"] or ""}
        yield chunk([{"index": index, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}])
        calls = [{"index": k, **call} for k, call in enumerate(message.get("tool_calls") or [])]
        if calls:
            yield chunk([{"index": index, "delta": {"tool_calls": calls}, "finish_reason": None}])
        yield chunk([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}])
    if include_usage:
        yield chunk([], usage=response["usage"])
    yield "data: [DONE]\n\n"
