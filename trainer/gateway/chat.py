"""Chat messages + tools -> prompt token ids, and model output text -> OpenAI message.

Rendering uses the tokenizer's own chat template (`apply_chat_template(messages,
tools=tools, add_generation_prompt=True)`). Fallback for templates that know nothing of
tools (no `tools` in the template source, e.g. SmolLM2's plain ChatML): the Hermes
convention is spelled out in the messages themselves before rendering —
  * a tools block (`<tools>` with one JSON spec a line, and how to call them) is appended to
    the system message (one is added when there is none);
  * an assistant message's `tool_calls` become `<tool_call>{"name": .., "arguments": ..}
    </tool_call>` lines in its content;
  * a `tool` message becomes a user message whose content is `<tool_response>..</tool_response>`
    (consecutive tool results share one user turn).

Parsing goes through a small registry of tool-call parsers (`TOOL_PARSERS`, extend with
`register_tool_parser`); "hermes" reads `<tool_call>{json}</tool_call>` blocks (and what small
models write instead: a list of calls, single quotes, an unclosed last block), and says why a
block it cannot read failed (`ParsedOutput.invalid`).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainer.models.templates import tools_header

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

class ChatFormatError(ValueError):
    """A message list the template cannot render; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ParsedOutput:
    """Model text split into the visible content and OpenAI-format tool calls."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # why each attempted call that could not be read failed

    def message(self) -> dict[str, Any]:
        """The assistant message as the OpenAI API returns it."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


# --- rendering ----------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """OpenAI content (string, None, or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{where}[{k}]: only text content parts are supported", f"{where}[{k}]")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"{where}: content must be a string, null or a list of text parts", where)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts the templates expect: string content, tool call arguments as JSON text."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in {"system", "user", "assistant", "tool"}:
            raise ChatFormatError(f"messages[{i}].role: expected system, user, assistant or tool, got {role!r}", f"messages[{i}].role")
        msg: dict[str, Any] = {"role": role, "content": _text(message.get("content"), f"messages[{i}].content")}
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for k, call in enumerate(message["tool_calls"]):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ChatFormatError(f"messages[{i}].tool_calls[{k}].function.name is missing", f"messages[{i}].tool_calls[{k}]")
                arguments = function.get("arguments", "{}")
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                calls.append({"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}})
            msg["tool_calls"] = calls
        if role == "tool":
            msg["tool_call_id"] = message.get("tool_call_id")
            if message.get("name"):
                msg["name"] = message["name"]
        out.append(msg)
    return out


def template_supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def hermes_tool_call_text(name: str, arguments: str) -> str:
    """One tool call the way the Hermes convention (and the tiny model's template) writes it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def _hermes_fallback(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Spell tools, tool calls and tool results out as text for a template without tool support."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            parts = [msg["content"]] if msg["content"] else []
            parts += [hermes_tool_call_text(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif msg["role"] == "tool":
            block = f"<tool_response>\n{msg['content']}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append(dict(msg))
    for msg in out:
        msg.pop("_tool_turn", None)
    if tools:
        header = tools_header(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{header}" if out[0]["content"] else header}
        else:
            out.insert(0, {"role": "system", "content": header})
    return out


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the prompt for the next assistant turn (generation prompt included)."""
    if not messages:
        raise ChatFormatError("messages: at least one message is required", "messages")
    if not tokenizer.chat_template:
        raise ChatFormatError("the tokenizer has no chat template; give the model directory one (chat_template.jinja)")
    normalized = normalize_messages(messages)
    return _encode(tokenizer, _render_text(tokenizer, normalized, tools, generation_prompt=True))


def _render_text(tokenizer: PreTrainedTokenizerBase, normalized: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 *, generation_prompt: bool) -> str:
    has_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in normalized)
    if has_tools and not template_supports_tools(tokenizer):
        normalized, tools = _hermes_fallback(normalized, tools), None
    try:
        return tokenizer.apply_chat_template(normalized, tools=tools or None, add_generation_prompt=generation_prompt,
                                             tokenize=False)
    except Exception as exc:  # jinja errors (e.g. a template that rejects a role order)
        raise ChatFormatError(f"messages: the chat template could not render them: {exc}", "messages") from exc


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer itself: same ids, without the Python wrapper's cost
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
    """A whole conversation as (token ids, loss mask) for supervised fine-tuning: the mask is 1 on
    exactly the tokens the model would have sampled for each assistant turn (the turn's text and the
    stop token that ends it), 0 on everything the gateway would have put in the prompt. Each assistant
    turn's prompt is `render_prompt(messages[:i], tools)`, the tokens RFT feeds the model there, and the
    conversation must extend it (else ChatFormatError naming the turn)."""
    if not tokenizer.chat_template:
        raise ChatFormatError("the tokenizer has no chat template; give the model directory one (chat_template.jinja)")
    normalized = normalize_messages(messages)
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int)}
    stops.discard(tokenizer.unk_token_id)
    ids: list[int] = []
    mask: list[int] = []
    for i, msg in enumerate(normalized):
        if msg["role"] != "assistant":
            continue
        if i == 0:
            raise ChatFormatError("messages[0]: a conversation cannot start with an assistant turn", "messages[0]")
        prompt = _encode(tokenizer, _render_text(tokenizer, normalized[:i], tools, generation_prompt=True))
        turn = _encode(tokenizer, _render_text(tokenizer, normalized[: i + 1], tools, generation_prompt=False))
        if prompt[: len(ids)] != ids or turn[: len(prompt)] != prompt:
            raise ChatFormatError(f"messages[{i}]: the chat template does not render this turn as an extension of "
                                  "the previous ones, so its tokens would differ from what RFT samples", f"messages[{i}]")
        completion = turn[len(prompt):]
        end = next((k + 1 for k, t in enumerate(completion) if t in stops), len(completion))
        mask += [0] * (len(prompt) - len(ids)) + [1] * end
        ids = prompt + completion[:end]
    if not ids:
        raise ChatFormatError("messages: no assistant turn to learn from", "messages")
    return ids, mask


# --- parsing ------------------------------------------------------------------------------

ToolParser = Callable[[str], ParsedOutput]
TOOL_PARSERS: dict[str, ToolParser] = {}


def register_tool_parser(name: str) -> Callable[[ToolParser], ToolParser]:
    def register(fn: ToolParser) -> ToolParser:
        TOOL_PARSERS[name] = fn
        return fn

    return register


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# a block runs to its closing tag, or (a turn that stopped before closing it) to the end of the text
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


def _load_payload(raw: str) -> tuple[Any, str]:
    """(the block's value, "") or (None, why not). JSON first; then Python literal syntax, which is
    what small models write when they use single quotes (`{'name': 'add', ...}`)."""
    try:
        return json.loads(raw), ""
    except json.JSONDecodeError as exc:
        error = f"not JSON ({exc.msg} at column {exc.colno})"
    try:
        return ast.literal_eval(raw), ""
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None, error


def _hermes_call(payload: Any) -> tuple[dict[str, Any] | None, str]:
    """One OpenAI tool call from a parsed block item, or (None, why not)."""
    if not isinstance(payload, dict):
        return None, f"not an object (a JSON {type(payload).__name__})"
    if not isinstance(payload.get("name"), str) or not payload["name"]:
        return None, "no string `name`"
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return None, "`arguments` is a string that is not JSON"
    if not isinstance(arguments, dict):
        return None, f"`arguments` is not an object (a JSON {type(arguments).__name__})"
    function = {"name": payload["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"id": new_tool_call_id(), "type": "function", "function": function}, ""


@register_tool_parser("hermes")
def parse_hermes(text: str) -> ParsedOutput:
    """`<tool_call>{"name": .., "arguments": {..}}</tool_call>` blocks become tool calls; the rest
    of the text is the content. Also read as small models write them: a JSON list of calls inside
    one block, single-quoted (Python-literal) keys and strings, a last block left unclosed at the end
    of the turn. A block that still cannot be read stays in the content as text (a malformed call
    is visible, not lost) and its reason is in `invalid`."""
    calls: list[dict[str, Any]] = []
    invalid: list[str] = []
    kept: list[str] = []
    position = 0
    for match in _HERMES_CALL.finditer(text):
        payload, error = _load_payload(match.group(1))
        items = payload if isinstance(payload, list) and payload else [payload]
        parsed = [_hermes_call(item) for item in items] if not error else [(None, error)]
        if any(call is None for call, _ in parsed):
            invalid += [why for call, why in parsed if call is None]
            continue
        calls += [call for call, _ in parsed if call is not None]
        kept.append(text[position : match.start()])
        position = match.end()
    kept.append(text[position:])
    if not calls:
        return ParsedOutput(content=text, invalid=invalid)
    content = "".join(kept).strip()
    return ParsedOutput(content=content or None, tool_calls=calls, invalid=invalid)


@register_tool_parser("none")
def parse_none(text: str) -> ParsedOutput:
    """No tool calls: the text is the content."""
    return ParsedOutput(content=text)


def parse_output(text: str, parser: str = "hermes") -> ParsedOutput:
    if parser not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {parser!r}; known: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[parser](text)
