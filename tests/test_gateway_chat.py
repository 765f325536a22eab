"""The gateway through the official `openai` client against a real uvicorn server: OpenAI
fields, recording of exact tokens, a multi-turn tool conversation, batching across rollouts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from openai import AsyncOpenAI, BadRequestError, InternalServerError

from env_sdk.models import RolloutMetadata
from tests.helpers import serve_app
from trainer.generation import ScriptedBackend, TransformersBackend
from trainer.types import SamplingParams
from trainer.gateway.chat import hermes_tool_call_text
from trainer.gateway import Gateway
from trainer.models import build_tiny_model, load_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        },
    }
]


def meta(rid: str) -> RolloutMetadata:
    return RolloutMetadata(invocation_id="inv", experiment_id="exp", rollout_id=rid, run_id="run", row_id="row-1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(tiny: Path):  # type: ignore[no-untyped-def]
    return load_model(tiny)


@pytest.fixture
def live(loaded) -> Iterator[tuple[Gateway, TransformersBackend, str]]:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    gateway = Gateway(backend, tokenizer, default_max_tokens=6)
    with serve_app(gateway.app) as base:
        yield gateway, backend, base
    backend.close()


def client(gateway: Gateway, base: str, rid: str) -> AsyncOpenAI:
    url, key = gateway.open_rollout(meta(rid), base)
    return AsyncOpenAI(base_url=url, api_key=key, max_retries=0)


async def test_completion_fields_and_recorded_tokens(live, loaded) -> None:  # type: ignore[no-untyped-def]
    gateway, backend, base = live
    _, tokenizer = loaded
    oa = client(gateway, base, "r1")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    reply = await oa.chat.completions.create(model="policy", messages=messages, max_tokens=5, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "policy"
    (choice,) = reply.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    (call,) = gateway.record("r1").calls
    assert call.messages == messages and call.tools is None and call.finish_reason == "length"
    assert call.prompt_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(call.prompt_ids)
    assert tokenizer.decode(call.completion_ids) == choice.message.content
    # the exact tokens and logprobs the backend sampled
    direct = await backend.generate(call.prompt_ids, SamplingParams(max_tokens=5, temperature=0))
    assert call.completion_ids == direct.token_ids
    assert torch.allclose(torch.tensor(call.logprobs), torch.tensor(direct.logprobs), atol=1e-4)
    # logprobs=True returns the recorded logprobs, token by token
    with_lp = await oa.chat.completions.create(model="policy", messages=messages, max_tokens=5, temperature=0, logprobs=True)
    lp = with_lp.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert [t.logprob for t in lp.content] == pytest.approx(call.logprobs, abs=1e-4)
    assert "".join(t.token for t in lp.content) == choice.message.content
    # defaults: max_tokens from the gateway, max_completion_tokens wins over max_tokens
    reply = await oa.chat.completions.create(model="policy", messages=messages)
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    reply = await oa.chat.completions.create(model="policy", messages=messages, max_tokens=9, max_completion_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3


async def test_n_choices_are_separate_calls_and_seeds_reproduce(live) -> None:  # type: ignore[no-untyped-def]
    gateway, backend, base = live
    oa = client(gateway, base, "r-n")
    messages = [{"role": "user", "content": "Say something"}]
    reply = await oa.chat.completions.create(model="policy", messages=messages, n=3, max_tokens=8, seed=11, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    calls = list(gateway.record("r-n").calls)
    assert len(calls) == 3 and len({tuple(c.completion_ids) for c in calls}) > 1
    assert backend.stats.batch_sizes[-1] == 3  # the n choices share one batch
    again = await oa.chat.completions.create(model="policy", messages=messages, n=3, max_tokens=8, seed=11, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    assert reply.usage is not None and reply.usage.completion_tokens == sum(len(c.completion_ids) for c in calls)


async def test_concurrent_rollouts_share_a_batch(live) -> None:  # type: ignore[no-untyped-def]
    gateway, backend, base = live
    clients = [client(gateway, base, f"c{i}") for i in range(6)]
    before = len(backend.stats.batch_sizes)
    await asyncio.gather(
        *(c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi " * (i + 1)}], max_tokens=4) for i, c in enumerate(clients))
    )
    assert backend.stats.batch_sizes[before:] == [6]
    assert all(len(gateway.record(f"c{i}").calls) == 1 for i in range(6))


async def test_bad_chat_bodies_are_400_naming_the_field(live) -> None:  # type: ignore[no-untyped-def]
    gateway, _, base = live
    oa = client(gateway, base, "r-bad")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),  # longer than the model's context
    ]
    for body, param in cases:
        with pytest.raises(BadRequestError) as err:
            await oa.chat.completions.create(model="policy", **body)
        error = err.value.body
        assert isinstance(error, dict) and error["param"] == param, (body, error)
        assert param.split("[")[0].split(".")[0] in error["message"]
    import httpx

    url, key = gateway.open_rollout(meta("r-bad"), base)
    async with httpx.AsyncClient() as http:
        raw = await http.post(url + "/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {key}"})
        assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
        listed = await http.post(url + "/chat/completions", json=[1], headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 400
    assert gateway.record("r-bad").calls == []


async def test_repeated_messages_render_the_same_prompt_and_errors_repeat(live, loaded) -> None:  # type: ignore[no-untyped-def]
    """The gateway renders a message list once (a GRPO group sends the same one n times): the
    prompt stays what the template gives for those messages and tools, and a bad list stays a 400."""
    gateway, _, base = live
    _, tokenizer = loaded
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompts = []
    for k, tools in enumerate([None, None, TOOLS, None]):
        oa = client(gateway, base, f"r-same-{k}")
        await oa.chat.completions.create(model="policy", messages=messages, max_tokens=1, **({"tools": tools} if tools else {}))
        prompts.append(gateway.record(f"r-same-{k}").calls[0].prompt_ids)
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert prompts[0] == prompts[1] == prompts[3] == plain
    assert prompts[2] == tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    oa = client(gateway, base, "r-same-bad")
    for _ in range(2):
        with pytest.raises(BadRequestError) as err:
            await oa.chat.completions.create(model="policy", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
        assert isinstance(err.value.body, dict) and err.value.body["param"] == "messages[0].content[0]"


async def test_multi_turn_tool_conversation_records_the_whole_dialogue(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    seen: list[str] = []

    def script(prompt_ids: list[int], params: SamplingParams) -> str:
        prompt = tokenizer.decode(prompt_ids)
        seen.append(prompt)
        if "<tool_response>" not in prompt:
            return hermes_tool_call_text("add", json.dumps({"a": 2, "b": 3}))
        return "The answer is 5."

    gateway = Gateway(ScriptedBackend(tokenizer, script, model=model), tokenizer)
    with serve_app(gateway.app) as base:
        oa = client(gateway, base, "tool-1")
        messages: list[dict[str, Any]] = [{"role": "user", "content": "What is 2+3? Use the tool."}]
        first = await oa.chat.completions.create(model="policy", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        (choice,) = first.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (tool_call,) = choice.message.tool_calls or []
        assert tool_call.function.name == "add" and json.loads(tool_call.function.arguments) == {"a": 2, "b": 3}
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": "5"})
        second = await oa.chat.completions.create(model="policy", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "The answer is 5."
        messages.append({"role": "assistant", "content": "The answer is 5."})

    record = gateway.close_rollout("tool-1")
    assert len(record.calls) == 2 and not record.prefix_mismatch
    one, two = record.calls
    assert one.response["tool_calls"][0]["function"]["name"] == "add" and one.tools == TOOLS
    # call 2's prompt extends call 1's prompt + completion, and the whole decodes to the dialogue
    assert two.prompt_ids[: len(one.prompt_ids) + len(one.completion_ids)] == one.prompt_ids + one.completion_ids
    full = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert tokenizer.decode(two.prompt_ids + two.completion_ids) + "\n" == full
    assert seen[1] == tokenizer.decode(two.prompt_ids)
    # logprobs are the model's own (teacher forcing), one per completion token
    for call in record.calls:
        assert len(call.logprobs) == len(call.completion_ids) and all(lp < 0 for lp in call.logprobs)


async def test_stop_strings_tool_choice_none_and_prefix_mismatch(loaded) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = loaded
    replies = iter(["Hello world. More text after the stop.", hermes_tool_call_text("add", "{}"), "fresh"])
    gateway = Gateway(ScriptedBackend(tokenizer, lambda ids, p: next(replies)), tokenizer)
    with serve_app(gateway.app) as base:
        oa = client(gateway, base, "s1")
        messages = [{"role": "user", "content": "hi"}]
        stopped = await oa.chat.completions.create(model="policy", messages=messages, stop=[" More", "."])
        assert stopped.choices[0].message.content == "Hello world" and stopped.choices[0].finish_reason == "stop"
        call = gateway.record("s1").calls[0]
        # kept: the tokens up to and including the stop string; dropped: what came after it
        assert tokenizer.decode(call.completion_ids) == "Hello world."
        assert len(call.logprobs) == len(call.completion_ids)
        raw = await oa.chat.completions.create(model="policy", messages=messages, tools=TOOLS, tool_choice="none")  # type: ignore[arg-type]
        assert raw.choices[0].message.tool_calls is None and "<tool_call>" in (raw.choices[0].message.content or "")
        assert raw.choices[0].finish_reason == "stop"
        record = gateway.record("s1")
        assert record.prefix_mismatch  # call 2 restarted from the same prompt, not a continuation
        assert len(record.calls) == 2


async def test_a_failing_backend_is_an_openai_style_500(loaded) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = loaded

    def broken(ids: list[int], params: SamplingParams) -> str:
        raise RuntimeError("CUDA out of memory (simulated)")

    gateway = Gateway(ScriptedBackend(tokenizer, broken), tokenizer)
    with serve_app(gateway.app) as base, pytest.raises(InternalServerError) as err:
        await client(gateway, base, "boom").chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "server_error" and "out of memory" in body["message"]
    assert gateway.record("boom").calls == []


async def test_streaming_clients_get_the_same_completion(loaded) -> None:  # type: ignore[no-untyped-def]
    """stream=True answers OpenAI's server-sent chunks: text, tool calls, finish reason, usage."""
    _, tokenizer = loaded
    replies = iter(["Let me add.\n" + hermes_tool_call_text("add", json.dumps({"a": 2, "b": 3})), "It is 5."])
    gateway = Gateway(ScriptedBackend(tokenizer, lambda ids, p: next(replies)), tokenizer)
    with serve_app(gateway.app) as base:
        oa = client(gateway, base, "stream")
        messages = [{"role": "user", "content": "What is 2+3?"}]
        stream = await oa.chat.completions.create(
            model="policy", messages=messages, tools=TOOLS, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert content == "Let me add." and finish == ["tool_calls"]
        assert [(tc.function.name, json.loads(tc.function.arguments or "")) for tc in calls] == [("add", {"a": 2, "b": 3})]
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == len(gateway.record("stream").calls[0].completion_ids)
        plain = await oa.chat.completions.create(model="policy", messages=messages, stream=True)  # type: ignore[arg-type]
        assert "".join([c.choices[0].delta.content or "" async for c in plain if c.choices]) == "It is 5."
    assert len(gateway.record("stream").calls) == 2
