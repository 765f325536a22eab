"""Tools as typed Python functions, and a ready agent loop over them.

`function_tool_spec(fn)` derives an OpenAI tool spec from the signature (JSON Schema via
pydantic) and the docstring (summary + Google-style `Args:` lines). `tool_agent(...)` returns
an `Agent` for `create_env_app` that chats with the policy, runs the tools it calls, and
scores the final conversation with an evaluator: an env author writes no loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from env_sdk.agent import Agent, AgentResult, RolloutTask
from env_sdk.models import EvaluationResult

Evaluator = Callable[
    [RolloutTask, list[dict[str, Any]]],
    EvaluationResult | float | None | Awaitable[EvaluationResult | float | None],
]
ToolsArg = Sequence[Callable[..., Any]] | Callable[[RolloutTask], Sequence[Callable[..., Any]]]


class ToolError(Exception):
    """Raised by a tool to report a failure to the model: its message becomes the tool result."""


def _docstring_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(summary, {param: description}) from a docstring with a Google-style `Args:` section."""
    doc = inspect.getdoc(fn) or ""
    summary_lines: list[str] = []
    params: dict[str, str] = {}
    section = "summary"
    current: str | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            section, current = "args", None
            continue
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):  # Returns:, Raises:, ...
            section = "other"
            continue
        if section == "summary":
            summary_lines.append(stripped)
        elif section == "args" and stripped:
            m = re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and not line.startswith(" " * 8):
                current = m.group(1)
                params[current] = m.group(3)
            elif current:
                params[current] = f"{params[current]} {stripped}".strip()
    summary = " ".join(" ".join(summary_lines).split())
    return summary, params


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


@dataclass
class _Tool:
    name: str
    fn: Callable[..., Any]
    args_model: type[BaseModel]
    spec: dict[str, Any]


def _build_tool(fn: Callable[..., Any]) -> _Tool:
    name = getattr(fn, "__name__", None)
    if not name or name == "<lambda>":
        raise TypeError(f"tool {fn!r} needs a name: use a def, not a lambda")
    try:
        hints = get_type_hints(fn)
    except Exception as exc:  # unresolvable forward reference
        raise TypeError(f"tool {name}: cannot resolve its type hints: {exc}") from exc
    summary, descriptions = _docstring_parts(fn)
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {name}: *{p.name} / **{p.name} cannot be described to a model")
        if p.name not in hints:
            raise TypeError(f"tool {name}: parameter {p.name!r} has no type annotation")
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints[p.name], Field(default, description=descriptions.get(p.name)))
    model = create_model(f"{name}_args", __config__=ConfigDict(extra="forbid"), **fields)
    parameters = _strip_titles(model.model_json_schema())
    parameters.setdefault("properties", {})
    function: dict[str, Any] = {"name": name, "description": summary, "parameters": parameters}
    if not summary:
        del function["description"]
    return _Tool(name=name, fn=fn, args_model=model, spec={"type": "function", "function": function})


def function_tool_spec(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI tool spec (`{"type": "function", "function": {...}}`) of a typed function."""
    return _build_tool(fn).spec


async def _call_tool(tool: _Tool, arguments: str) -> tuple[str, bool]:
    """Run one tool call; (content for the model, whether it was an error)."""
    try:
        raw = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"error: arguments of {tool.name} are not valid JSON: {exc}", True
    if not isinstance(raw, dict):
        return f"error: arguments of {tool.name} must be a JSON object, got {type(raw).__name__}", True
    try:
        args = tool.args_model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
        return f"error: invalid arguments for {tool.name}: {problems}", True
    kwargs = {k: getattr(args, k) for k in type(args).model_fields}
    try:
        if inspect.iscoroutinefunction(tool.fn):
            result = await tool.fn(**kwargs)
        else:  # a blocking tool must not stall every other rollout on this server
            result = await asyncio.to_thread(tool.fn, **kwargs)
    except ToolError as exc:
        return f"error: {exc}", True
    if isinstance(result, str):
        return result, False
    if isinstance(result, BaseModel):
        return result.model_dump_json(), False
    return json.dumps(result, default=str), False


def _as_agent_result(value: Any, messages: list[dict[str, Any]], reason: str, metrics: dict[str, float]) -> AgentResult:
    if isinstance(value, EvaluationResult):
        return AgentResult(reward=value.score, messages=messages, info={"reason": value.reason},
                           metrics={**metrics, **value.metrics}, termination_reason=reason)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return AgentResult(reward=value, messages=messages, metrics=metrics, termination_reason=reason)
    raise TypeError(f"evaluator returned {type(value).__name__}; expected EvaluationResult, float or None")


def tool_agent(
    tools: ToolsArg,
    *,
    evaluator: Evaluator | None = None,
    max_turns: int = 8,
    stop_tools: Collection[str] = (),
    system_prompt: str | None = None,
) -> Agent:
    """An agent that chats with the policy and runs the tools it calls, for at most `max_turns`
    model calls.

    tools: typed functions (sync or async), or a function of the task returning them (for
      per-rollout state). Sync tools run in a worker thread.
    evaluator: scores the final conversation (EvaluationResult, float, or None = trainer scores).
    stop_tools: calling one of these ends the episode after it runs (termination "submitted").
    system_prompt: prepended unless the task's messages already start with a system message.

    The model sees the task's tools when the InitRequest has them, else the specs of `tools`.
    A ToolError, arguments that are not valid JSON or do not match the signature, and unknown
    tool names are reported to the model as the tool result; any other exception in a tool
    fails the rollout (status INTERNAL).
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    static: dict[str, _Tool] | None = None
    if not callable(tools):
        static = {t.name: t for t in map(_build_tool, tools)}
        if missing := set(stop_tools) - set(static):
            raise ValueError(f"stop_tools {sorted(missing)} are not among the tools {sorted(static)}")

    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
        registry = static if static is not None else {t.name: t for t in map(_build_tool, tools(task))}  # type: ignore[operator]
        advertised = task.tools or [t.spec for t in registry.values()]
        messages = list(task.messages)
        if system_prompt and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        kwargs = task.completion_kwargs()
        if advertised:
            kwargs["tools"] = advertised
        turns = n_calls = n_errors = 0
        reason = "max_turns"
        while turns < max_turns:
            turns += 1
            response = await client.chat.completions.create(messages=messages, **kwargs)  # type: ignore[arg-type]
            choice = response.choices[0]
            messages.append(choice.message.model_dump(exclude_none=True))
            if not choice.message.tool_calls:
                reason = "length" if choice.finish_reason == "length" else "stop"
                break
            stop = False
            for call in choice.message.tool_calls:
                fn = getattr(call, "function", None)
                name = getattr(fn, "name", "")
                n_calls += 1
                tool = registry.get(name)
                if tool is None:
                    content, failed = f"error: unknown tool {name!r}; available: {sorted(registry)}", True
                else:
                    content, failed = await _call_tool(tool, getattr(fn, "arguments", "") or "")
                    stop = stop or name in stop_tools
                n_errors += failed
                messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
            if stop:
                reason = "submitted"
                break
        metrics = {"turns": float(turns),
                   "tool_calls": float(n_calls), "tool_errors": float(n_errors)}
        value: Any = None
        if evaluator is not None:
            value = evaluator(task, messages)
            if inspect.isawaitable(value):
                value = await value
        return _as_agent_result(value, messages, reason, metrics)

    return agent
