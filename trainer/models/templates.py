"""The chat format every local model here speaks: ChatML with Hermes-style tools (Qwen2.5
conventions: tools listed in the system turn, assistant tool calls as `<tool_call>{json}</tool_call>`,
tool results as `<tool_response>` inside a user turn).

One owner for the markup: the tiny model's and SmolLM2's chat templates are built from these
pieces, and the gateway's fallback rendering (trainer/gateway/chat.py) writes the same tools header
for templates without tool support, so the tokens a model is trained on are the tokens it samples.
"""

from __future__ import annotations

import json
from typing import Any

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Tool markup gets one token each (not special: it must survive decode(skip_special_tokens=True)).
MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
DEFAULT_SYSTEM = "You are a helpful assistant."

TOOLS_INTRO = "# Tools\n\nFunction signatures are listed inside <tools></tools>:\n<tools>"
TOOLS_OUTRO = (
    "\n</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments inside "
    '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_header(tools: list[dict[str, Any]]) -> str:
    """The system turn's tools listing as text (what TOOLS_LISTING renders for these tools)."""
    return TOOLS_INTRO + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_OUTRO


def _jinja(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Shared by every tools-aware ChatML template here (SmolLM2's too): the tools listing of the
# system turn, and the assistant / tool turns.
TOOLS_LISTING = (
    "{{- " + _jinja("\n\n" + TOOLS_INTRO) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + _jinja(TOOLS_OUTRO) + " }}"
)
ASSISTANT_AND_TOOL_TURNS = (
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)

# ChatML with tools. Assistant tool calls render exactly as the Hermes parser in
# trainer/gateway/chat.py expects the model to write them, so a sampled tool call re-renders to the
# same text in the next turn (the gateway's prefix check depends on that).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- '" + DEFAULT_SYSTEM + "' }}{%- endif %}"
    + TOOLS_LISTING
    + "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    + ASSISTANT_AND_TOOL_TURNS
    + "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
