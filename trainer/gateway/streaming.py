"""Chat completions as OpenAI's server-sent chunks, for the gateway and `openrft serve`.

With a backend that reports tokens as it samples them (`StreamingBackend`), each choice's text is
sent as it becomes stable (`_TextStream`); its tool calls, the rest of its content and its finish
reason follow when it ends, from the same `ChoiceResult` the non-streamed answer is built from. Any
other backend's choices (and `completion_response` of a whole completion) arrive whole.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from trainer.gateway.http import as_api_error
from trainer.types import Generation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from trainer.gateway.completions import _Call, ChatCompleter, ChatCompletionRequest, ChoiceResult, Completion


def usage(prompt_ids: list[int], choices: list[ChoiceResult]) -> dict[str, int]:
    completion_tokens = sum(len(c.completion_ids) for c in choices)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens, "total_tokens": len(prompt_ids) + completion_tokens}


def completion_response(completion: Completion) -> Response:
    """The HTTP answer: the JSON body, or with `stream: true` the same completion as OpenAI's
    server-sent chunks (generated whole first, then sent: a client that streams works, it just
    sees the text arrive at once)."""
    if not completion.request.stream:
        return JSONResponse(completion.response)  # already JSON-ready: skip FastAPI's encoder
    return StreamingResponse(_whole_sse(completion.response, includeusage(completion.request)), media_type="text/event-stream")


def includeusage(request: ChatCompletionRequest) -> bool:
    return bool((request.stream_options or {}).get("include_usage"))


_DONE = "data: [DONE]\n\n"


def _whole_sse(response: dict[str, Any], include_usage: bool) -> Iterator[str]:
    chunks = _Chunks(response["id"], response["created"], response["model"])
    for choice in response["choices"]:
        yield from chunks.ending(choice, "")
    if include_usage:
        yield chunks.event([], usage=response["usage"])
    yield _DONE


class _Chunks:
    """The `chat.completion.chunk` events of one response. The first delta of a choice carries its role."""

    def __init__(self, id_: str, created: int, model: str) -> None:
        self.head = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model}
        self.opened: set[int] = set()

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**self.head, 'choices': choices, **extra})}\n\n"

    def delta(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None, finish_reason: str | None = None) -> str:
        if index not in self.opened:
            self.opened.add(index)
            delta = {"role": "assistant", **delta}
        return self.event([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def ending(self, choice: dict[str, Any], sent: str) -> Iterator[str]:
        """The last chunks of `choice` (as in the response body) once `sent` was streamed: the
        rest of its content, its tool calls, then its logprobs (all of them) and finish reason."""
        index, message = choice["index"], choice["message"]
        rest = _unsent(sent, message["content"] or "")
        if rest or index not in self.opened:
            yield self.delta(index, {"content": rest})
        calls = [{"index": k, **call} for k, call in enumerate(message.get("tool_calls") or [])]
        if calls:
            yield self.delta(index, {"tool_calls": calls})
        yield self.delta(index, {}, choice["logprobs"], choice["finish_reason"])


def _unsent(sent: str, content: str) -> str:
    """What of a choice's final content the client lacks after `sent`. `sent` is a prefix of it,
    except that content around a parsed tool call is stripped: leading whitespace sent is surplus."""
    if content.startswith(sent):
        return content[len(sent) :]
    return content[len(sent.lstrip()) :]


#: Where each tool parser's markup begins: streamed content stops before it, the parsed calls
#: follow at the end. A parser not listed gets "", which begins anywhere: its choices arrive whole.
_TOOL_CALL_START: dict[str, str | None] = {"hermes": "<tool_call>", "none": None}


class _TextStream:
    """One choice's content as its tokens arrive. Stable text is sent: the decoded text of the
    tokens so far, less a trailing U+FFFD (a character not all of whose bytes are sampled), less
    anything from where a stop string or tool-call markup begins or may begin, and, when tool
    calls are parsed, less trailing whitespace (the message strips it before a call)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], call_start: str | None) -> None:
        self.tokenizer, self.stops, self.call_start = tokenizer, stops, call_start
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        """Add a sampled token; return the text that became stable (often "")."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stable = text[: self._stable_end(text)]
        if not stable.startswith(self.sent):  # a tokenizer's clean-up rewrote text already sent
            return ""
        delta, self.sent = stable[len(self.sent) :], stable
        return delta

    def _stable_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        for stop in self.stops:
            end = min(end, _clear_of(text, stop))
        if self.call_start is not None:
            end = len(text[: min(end, _clear_of(text, self.call_start))].rstrip())
        return end


def _clear_of(text: str, marker: str) -> int:
    """The length of the start of `text` that is no part of `marker`: up to its first occurrence,
    else up to a suffix that `marker` begins with."""
    at = text.find(marker)
    if at >= 0:
        return at
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)


_Event = tuple[int, int | Generation | Exception]


class LiveStream:
    """A streamed request: its choices generate concurrently and every event (a token sampled,
    a choice done, a failure) becomes chunks as it happens."""

    def __init__(self, completer: ChatCompleter, call: _Call) -> None:
        self.completer, self.call = completer, call
        call_start = _TOOL_CALL_START.get(completer.tool_parser, "") if call.parse_tools else None
        self.texts = [_TextStream(completer.tokenizer, call.stops, call_start) for _ in range(call.request.n)]
        self.results: list[ChoiceResult | None] = [None] * call.request.n
        self.chunks = _Chunks(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), completer.model_name)
        self.events: asyncio.Queue[_Event] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._run(i)) for i in range(call.request.n)]

    async def _run(self, index: int) -> None:
        try:
            result: Generation | Exception = await self.completer._generate_streamed(self.call, index, functools.partial(self._token, index))
        except Exception as exc:
            result = exc
        self.events.put_nowait((index, result))

    def _token(self, index: int, token: int) -> None:
        self.events.put_nowait((index, token))

    async def start(self) -> Response:
        """The response, once the first event is in: a failure before any output (a prompt too
        long for the model) is still answered with its HTTP status."""
        first = await self.events.get()
        if isinstance(first[1], Exception):
            self._cancel()
            raise first[1]
        return StreamingResponse(self._sse(first), media_type="text/event-stream")

    async def _sse(self, event: _Event) -> AsyncIterator[str]:
        try:
            while True:
                index, item = event
                if isinstance(item, Exception):
                    yield f"data: {json.dumps(as_api_error(item).body())}\n\n"
                    return
                for chunk in self._chunks(index, item):
                    yield chunk
                if all(r is not None for r in self.results):
                    break
                event = await self.events.get()
            if includeusage(self.call.request):
                yield self.chunks.event([], usage=usage(self.call.prompt_ids, [r for r in self.results if r is not None]))
            yield _DONE
        finally:
            self._cancel()  # a client gone mid-stream: its rows stop generating

    def _chunks(self, index: int, item: int | Generation) -> Iterator[str]:
        text = self.texts[index]
        if isinstance(item, int):
            delta = text.push(item)
            if delta:
                yield self.chunks.delta(index, {"content": delta})
            return
        call, completer = self.call, self.completer
        result = self.results[index] = completer._choice(item, call.stops, call.parse_tools)
        yield from self.chunks.ending(completer._choice_body(index, result, bool(call.request.logprobs)), text.sent)

    def _cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
