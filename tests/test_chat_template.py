"""Chat rendering (template with tools, and the Hermes fallback for templates without) and
tool-call parsing."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from trainer.gateway.chat import (
    TOOL_PARSERS,
    ChatFormatError,
    ParsedOutput,
    hermes_tool_call_text,
    parse_output,
    register_tool_parser,
    render_prompt,
)
from trainer.models import build_tiny_model

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
CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "5"},
]

# SmolLM2-style ChatML: no notion of tools at all
PLAIN_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def plain_tokenizer(tokenizer):  # type: ignore[no-untyped-def]
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = PLAIN_CHATML
    return plain


def test_renders_with_the_models_template(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = render_prompt(tokenizer, CONVERSATION, TOOLS)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert json.dumps(TOOLS[0]) in text
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_content_parts_and_null_content_become_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+3?"}]}]
    assert render_prompt(tokenizer, parts) == render_prompt(tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    with pytest.raises(ChatFormatError) as err:
        render_prompt(tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert err.value.param == "messages[0].content[0]"
    with pytest.raises(ChatFormatError, match=r"messages\[1\]\.role"):
        render_prompt(tokenizer, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])


def test_hermes_fallback_for_a_template_without_tools(plain_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = plain_tokenizer.decode(render_prompt(plain_tokenizer, [{"role": "system", "content": "Be brief."}, *CONVERSATION], TOOLS))
    system, user, assistant, tool_turn, prompt = text.split("<|im_end|>\n")
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and json.dumps(TOOLS[0]) in system
    assert "<tool_call>" in system  # the calling convention is explained
    assert user == "<|im_start|>user\nWhat is 2+3?"
    assert assistant == "<|im_start|>assistant\n" + hermes_tool_call_text("add", '{"a": 2, "b": 3}')
    assert tool_turn == "<|im_start|>user\n<tool_response>\n5\n</tool_response>"
    assert prompt == "<|im_start|>assistant\n"
    # no system message: one is added for the tools; no tools: nothing is added
    no_system = plain_tokenizer.decode(render_prompt(plain_tokenizer, CONVERSATION[:1], TOOLS))
    assert no_system.startswith("<|im_start|>system\n# Tools")
    bare = plain_tokenizer.decode(render_prompt(plain_tokenizer, CONVERSATION[:1]))
    assert bare == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_without_template_is_a_clear_error(plain_tokenizer) -> None:  # type: ignore[no-untyped-def]
    plain_tokenizer.chat_template = None
    with pytest.raises(ChatFormatError, match="no chat template"):
        render_prompt(plain_tokenizer, CONVERSATION[:1])


def test_hermes_parser() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n<tool_call>{"name": "neg", "arguments": {"x": 1}}</tool_call>'
    parsed = parse_output(text, "hermes")
    assert parsed.content == "Let me add."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("add", {"a": 2, "b": 3}),
        ("neg", {"x": 1}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == 2
    only_call = parse_output(hermes_tool_call_text("add", '{"a": 1}'))
    assert only_call.content is None and only_call.message()["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    # malformed or unfinished blocks stay visible as text, never half-parsed
    for bad in ["<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "add"']:
        out = parse_output(bad)
        assert (out.content, out.tool_calls) == (bad, []) and "tool_calls" not in out.message()


def test_parser_registry() -> None:
    assert parse_output("<tool_call>{\"name\": \"x\"}</tool_call>", "none").tool_calls == []

    @register_tool_parser("test-upper")
    def upper(text: str) -> ParsedOutput:
        return ParsedOutput(content=text.upper())

    try:
        assert parse_output("abc", "test-upper").content == "ABC"
    finally:
        del TOOL_PARSERS["test-upper"]
    with pytest.raises(ValueError, match="unknown tool parser 'nope'"):
        parse_output("x", "nope")


def test_tiny_template_and_hermes_agree(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """What the parser reads back from a tool call re-renders to the very same text."""
    model_text = hermes_tool_call_text("add", '{"a": 2, "b": 3}')
    parsed = parse_output(model_text)
    messages = [CONVERSATION[0], parsed.message()]
    rendered = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n" + model_text + "<|im_end|>\n")


def test_hermes_parser_reads_what_small_models_write() -> None:
    as_list = parse_output('<tool_call>[{"name": "add", "arguments": {"a": 1}}, {"name": "neg", "arguments": {"x": 2}}]</tool_call>')
    assert [c["function"]["name"] for c in as_list.tool_calls] == ["add", "neg"] and not as_list.invalid
    quoted = parse_output("<tool_call>\n{'name': 'add', 'arguments': {'a': 1, 'b': 'x'}}\n</tool_call>")
    assert json.loads(quoted.tool_calls[0]["function"]["arguments"]) == {"a": 1, "b": "x"}
    unclosed = parse_output('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n')
    assert unclosed.content == "Sure." and unclosed.tool_calls[0]["function"]["name"] == "add"
    string_args = parse_output('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert json.loads(string_args.tool_calls[0]["function"]["arguments"]) == {"a": 1}


def test_hermes_parser_says_why_a_call_is_invalid() -> None:
    cases = {
        "<tool_call>{not json}</tool_call>": "not JSON",
        '<tool_call>{"arguments": {}}</tool_call>': "no string `name`",
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>': "`arguments` is not an object",
        '<tool_call>"add"</tool_call>': "not an object",
        '<tool_call>{"name": "add"': "not JSON",
    }
    for text, reason in cases.items():
        out = parse_output(text)
        assert out.tool_calls == [] and out.content == text, text
        assert len(out.invalid) == 1 and out.invalid[0].startswith(reason), (text, out.invalid)
    mixed = parse_output('<tool_call>{"name": "ok", "arguments": {}}</tool_call><tool_call>{bad}</tool_call>')
    assert [c["function"]["name"] for c in mixed.tool_calls] == ["ok"] and len(mixed.invalid) == 1


@pytest.mark.parametrize("which", ["tools_template", "hermes_fallback"])
def test_sft_tokens_are_the_tokens_rft_samples(tokenizer, plain_tokenizer, which) -> None:  # type: ignore[no-untyped-def]
    """render_conversation: each assistant turn's prompt is exactly the gateway's prompt for it, and the
    loss mask covers exactly what the model would sample there (the turn's text + end of turn)."""
    from trainer.gateway.chat import render_conversation

    tok = tokenizer if which == "tools_template" else plain_tokenizer
    conversation = [*CONVERSATION, {"role": "assistant", "content": "The answer is 5."}]
    ids, mask = render_conversation(tok, conversation, TOOLS)
    assert len(ids) == len(mask)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    spans, start = [], None
    for k, m in enumerate([*mask, 0]):
        if m and start is None:
            start = k
        if not m and start is not None:
            spans.append((start, k))
            start = None
    assert [start for start, _ in spans] == [len(render_prompt(tok, conversation[:i], TOOLS)) for i in (1, 3)]
    for (start, stop), i in zip(spans, (1, 3)):
        assert ids[:start] == render_prompt(tok, conversation[:i], TOOLS)
        assert ids[stop - 1] == end
        sampled = parse_output(tok.decode(ids[start:stop - 1], skip_special_tokens=True))
        assert sampled.message()["content"] == conversation[i]["content"]
        assert [c["function"] for c in sampled.tool_calls] == [c["function"] for c in conversation[i].get("tool_calls", [])]
    with pytest.raises(ChatFormatError, match="no assistant turn"):
        render_conversation(tok, CONVERSATION[:1], TOOLS)
