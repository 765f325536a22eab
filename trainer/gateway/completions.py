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

Streaming (`ChatCompleter.respond` with `stream: true`) is streaming.py's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from env_sdk.models import Message, Tool
from trainer.types import Generation, GenerationBackend, SamplingParams, StreamingBackend, TokenSink
from trainer.gateway.chat import ChatFormatError, parse_output, render_prompt
from trainer.gateway.http import APIError, parse_body
from trainer.gateway.streaming import LiveStream, completion_response, usage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
    policy_version: int | None = None
    tool_call_errors: list[str] = field(default_factory=list)  # why attempted tool calls could not be read


@dataclass(slots=True)
class _Call:
    """A validated request with its prompt rendered: what generating its choices needs."""

    request: ChatCompletionRequest
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prompt_ids: list[int]
    stops: list[str]
    stop_ids: tuple[int, ...]
    parse_tools: bool


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

    def __init__(self, backend: GenerationBackend, tokenizer: PreTrainedTokenizerBase, *, model_name: str = "policy", default_max_tokens: int = 256, tool_parser: str = "hermes") -> None:
        parse_output("", tool_parser)  # fail now on an unknown parser name
        self.backend, self.tokenizer = backend, tokenizer
        self.model_name, self.default_max_tokens, self.tool_parser = model_name, default_max_tokens, tool_parser
        self.streaming = backend if isinstance(backend, StreamingBackend) else None
        # A GRPO group's rollouts send the same messages: render (template + tokenize, ~40 us) once.
        self._render = functools.lru_cache(maxsize=4096)(self._render_uncached)

    def _render_uncached(self, key: str) -> tuple[int, ...]:
        """Prompt ids of the JSON `[messages, tools]`; a ChatFormatError is raised, not cached."""
        messages, tools = json.loads(key)
        return tuple(render_prompt(self.tokenizer, messages, tools))

    def parse_request(self, body: Any) -> ChatCompletionRequest:
        request = parse_body(ChatCompletionRequest, body, "request body")
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

    def _prepare(self, body: Any) -> _Call:
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
        parse = request.tool_choice != "none" and bool(tools)
        return _Call(request, messages, tools, prompt_ids, stops, stop_ids, parse)

    async def complete(self, body: Any) -> Completion:
        return await self._complete(self._prepare(body))

    async def respond(self, body: Any) -> Response:
        """The HTTP answer to a request body: `completion_response(complete(body))`, except that
        with `stream: true` chunks are sent as the tokens are sampled."""
        call = self._prepare(body)
        if call.request.stream:
            return await LiveStream(self, call).start()
        return completion_response(await self._complete(call))

    async def _complete(self, call: _Call) -> Completion:
        try:
            generations = await asyncio.gather(
                *(self.backend.generate(call.prompt_ids, self._sampling(call.request, call.stop_ids, i)) for i in range(call.request.n))
            )
        except ValueError as exc:
            raise _prompt_error(exc) from None
        choices = [self._choice(g, call.stops, call.parse_tools) for g in generations]
        response = self._response(call.prompt_ids, choices, bool(call.request.logprobs))
        return Completion(call.request, call.messages, call.tools, call.prompt_ids, choices, response)

    async def _generate_streamed(self, call: _Call, index: int, on_token: TokenSink) -> Generation:
        """Choice `index`, its tokens handed to `on_token` as they are sampled if the backend can."""
        try:
            params = self._sampling(call.request, call.stop_ids, index)
            if self.streaming is None:
                return await self.backend.generate(call.prompt_ids, params)
            return await self.streaming.generate_streamed(call.prompt_ids, params, on_token)
        except ValueError as exc:
            raise _prompt_error(exc) from None

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
        return ChoiceResult(ids, logprobs, parsed.message(), finish, gen.policy_version, parsed.invalid)

    def _logprobs(self, choice: ChoiceResult) -> dict[str, Any]:
        """OpenAI's `logprobs.content`: each completion token with its recorded (temperature-1)
        logprob. `top_logprobs` stays empty: only the sampled token's logprob is kept."""
        content = []
        for token_id, logprob in zip(choice.completion_ids, choice.logprobs):
            token = self.tokenizer.decode([token_id])
            content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []})
        return {"content": content, "refusal": None}

    def _choice_body(self, index: int, choice: ChoiceResult, logprobs: bool) -> dict[str, Any]:
        logs = self._logprobs(choice) if logprobs else None
        return {"index": index, "message": choice.message, "finish_reason": choice.finish_reason, "logprobs": logs}

    def _response(self, prompt_ids: list[int], choices: list[ChoiceResult], logprobs: bool = False) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [self._choice_body(i, c, logprobs) for i, c in enumerate(choices)],
            "usage": usage(prompt_ids, choices),
        }

    def models_response(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "openrft"}]}


def _prompt_error(exc: ValueError) -> APIError:
    """A backend's ValueError: a prompt it cannot take (e.g. longer than the model's context)."""
    return APIError(400, f"messages: {exc}", param="messages")


