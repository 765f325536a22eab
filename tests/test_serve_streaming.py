"""`openrft serve` with stream=true: each token's text reaches the official openai client as it
is sampled, the same text the non-streamed answer has; tool calls arrive as delta.tool_calls."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.helpers import serve_app
from trainer.generation import ScriptedBackend, TransformersBackend
from trainer.types import Generation, SamplingParams, TokenSink
from trainer.gateway.chat import hermes_tool_call_text, render_prompt
from trainer.models import build_tiny_model, load_model
from trainer.commands.serve import create_app

HI = [{"role": "user", "content": "What is 2+3?"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
#: Seconds each model forward takes in the timing test: 16 tokens then take about 0.8 s.
FORWARD_DELAY_S = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def slow_backend(tiny: Path) -> Iterator[TransformersBackend]:
    """The tiny model, each forward slowed down so that tokens are sampled far apart in time."""
    model, tokenizer = load_model(tiny)
    model.register_forward_pre_hook(lambda *_: time.sleep(FORWARD_DELAY_S))
    backend = TransformersBackend(model, tokenizer)
    yield backend
    backend.close()


class StreamingScript(ScriptedBackend):
    """The scripted backend, reporting its tokens one by one like a sampler that streams."""

    async def generate_streamed(self, prompt_ids: list[int], params: SamplingParams, on_token: TokenSink) -> Generation:
        generation = await self.generate(prompt_ids, params)
        for token in generation.token_ids:
            on_token(token)
            await asyncio.sleep(0)
        return generation


async def _stream(client: AsyncOpenAI, **kwargs: Any) -> list[tuple[float, ChatCompletionChunk]]:
    """The chunks of a streamed completion, each with the time it arrived."""
    stream = await client.chat.completions.create(model="policy", stream=True, **kwargs)
    return [(time.monotonic(), chunk) async for chunk in stream]


def _contents(chunks: list[tuple[float, ChatCompletionChunk]], index: int = 0) -> list[str]:
    return [c.choices[0].delta.content for _, c in chunks if c.choices and c.choices[0].index == index and c.choices[0].delta.content]


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 3)])
async def test_each_token_is_sent_as_it_is_sampled(slow_backend: TransformersBackend, temperature: float, seed: int | None) -> None:
    tokenizer = slow_backend.tokenizer
    request: dict[str, Any] = {"messages": HI, "max_tokens": 16, "temperature": temperature, "seed": seed}
    with serve_app(create_app(slow_backend, tokenizer)) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(model="policy", **request)
        chunks = await _stream(client, stream_options={"include_usage": True}, **request)
    direct = await slow_backend.generate(render_prompt(tokenizer, HI), SamplingParams(max_tokens=16, temperature=temperature, seed=seed))
    ids = direct.token_ids
    texts = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    # a token adds no stable text when it ends in part of a character (its text waits for the next)
    held = sum(texts[k + 1].endswith("\ufffd") or texts[k + 1] == texts[k] for k in range(len(ids)))
    contents = _contents(chunks)
    assert whole.usage is not None and whole.usage.completion_tokens == len(ids) == 16
    assert "".join(contents) == whole.choices[0].message.content == texts[-1]
    assert len(contents) >= len(ids) - held > 2
    content_times = [t for t, c in chunks if c.choices and c.choices[0].delta.content]
    assert content_times[-1] - content_times[0] > 10 * FORWARD_DELAY_S  # sent while generating, not at the end
    finish = [c.choices[0].finish_reason for _, c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason] == ["length"]
    assert chunks[0][1].choices[0].delta.role == "assistant"
    assert chunks[-1][1].usage is not None and chunks[-1][1].usage.completion_tokens == 16


async def test_choices_stream_side_by_side_and_a_closed_stream_stops_generating(slow_backend: TransformersBackend) -> None:
    request: dict[str, Any] = {"messages": HI, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 2}
    with serve_app(create_app(slow_backend, slow_backend.tokenizer)) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(model="policy", **request)
        chunks = await _stream(client, **request)
        assert ["".join(_contents(chunks, i)) for i in (0, 1)] == [c.message.content for c in whole.choices]

        before = slow_backend.stats.generated_tokens
        stream = await client.chat.completions.create(model="policy", stream=True, messages=HI, max_tokens=400, temperature=0)
        await anext(aiter(stream))
        await stream.close()
        await asyncio.sleep(20 * FORWARD_DELAY_S)
        stopped = slow_backend.stats.generated_tokens
        await asyncio.sleep(10 * FORWARD_DELAY_S)
        assert slow_backend.stats.generated_tokens == stopped < before + 50


async def test_a_tool_call_streams_as_delta_tool_calls(tiny: Path) -> None:
    _, tokenizer = load_model(tiny)
    reply = "Checking the weather.\n" + hermes_tool_call_text("get_weather", json.dumps({"city": "Paris"}))
    app = create_app(StreamingScript(tokenizer, lambda ids, params: reply), tokenizer)
    with serve_app(app) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        chunks = await _stream(client, messages=HI, tools=TOOLS)
        whole = await client.chat.completions.create(model="policy", messages=HI, tools=TOOLS)  # type: ignore[arg-type]
    contents = _contents(chunks)
    assert "".join(contents) == whole.choices[0].message.content == "Checking the weather."
    assert len(contents) > 2 and not any("<" in c for c in contents)  # streamed, without markup
    (call,) = [tc for _, c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert call.index == 0 and call.id and call.type == "function" and call.function is not None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments or "") == {"city": "Paris"}
    assert [c.choices[0].finish_reason for _, c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


async def test_stop_strings_are_held_back_and_a_backend_that_cannot_stream_sends_one_chunk(tiny: Path) -> None:
    _, tokenizer = load_model(tiny)
    reply = "The answer is 5. END of the answer"
    with serve_app(create_app(StreamingScript(tokenizer, lambda ids, params: reply), tokenizer)) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        chunks = await _stream(client, messages=HI, stop=["END"])
    assert "".join(_contents(chunks)) == "The answer is 5. " and not any("E" in c for c in _contents(chunks))
    assert [c.choices[0].finish_reason for _, c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    with serve_app(create_app(ScriptedBackend(tokenizer, lambda ids, params: reply), tokenizer)) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert _contents(await _stream(client, messages=HI)) == [reply]


async def test_a_failure_before_any_token_is_an_http_error(slow_backend: TransformersBackend) -> None:
    too_long = [{"role": "user", "content": "hi " * 3000}]
    with serve_app(create_app(slow_backend, slow_backend.tokenizer)) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="the model takes at most"):
            await _stream(client, messages=too_long)


class FailingMidway(ScriptedBackend):
    """Reports the tokens of "Hello there", then fails (a backend out of memory mid-generation)."""

    async def generate_streamed(self, prompt_ids: list[int], params: SamplingParams, on_token: TokenSink) -> Generation:
        for token in self.tokenizer.encode("Hello there", add_special_tokens=False):
            on_token(token)
        await asyncio.sleep(0)
        raise RuntimeError("CUDA out of memory (simulated)")


async def test_a_failure_midway_ends_the_stream_with_an_error_event(tiny: Path) -> None:
    _, tokenizer = load_model(tiny)
    with serve_app(create_app(FailingMidway(tokenizer, lambda ids, params: ""), tokenizer)) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(model="policy", stream=True, messages=HI)  # type: ignore[arg-type]
        received: list[str] = []
        with pytest.raises(openai.APIError, match="out of memory"):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello there"
