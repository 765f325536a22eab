"""What an env author writes against: the task an agent function receives, what it returns, and
the agent function's type. `create_env_app(agent)` serves one; `tool_agent(...)` builds one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai

from env_sdk.models import RolloutMetadata

# Parameters `chat.completions.create` takes as keyword arguments; other completion_params go
# to the server in `extra_body` (e.g. vLLM's top_k).
_OPENAI_CHAT_PARAMS = frozenset(
    {
        "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "n",
        "parallel_tool_calls", "presence_penalty", "reasoning_effort", "response_format", "seed",
        "stop", "temperature", "tool_choice", "top_logprobs", "top_p", "user", "metadata",
    }
)  # fmt: skip


@dataclass
class RolloutTask:
    """What an agent function receives for one rollout."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    metadata: RolloutMetadata
    completion_params: dict[str, Any]
    task_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def traceparent(self) -> str | None:
        """The trainer's W3C trace context for this rollout (sent on each model call already); an agent
        with OpenTelemetry spans of its own parents them on it."""
        value = (self.metadata.model_extra or {}).get("traceparent")
        return value if isinstance(value, str) else None

    @property
    def model(self) -> str:
        return str(self.completion_params.get("model", "policy"))

    def completion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.chat.completions.create(**kwargs, messages=...)`:
        the model plus completion_params, unknown ones moved into `extra_body`."""
        kwargs: dict[str, Any] = {"model": self.model}
        extra: dict[str, Any] = dict(self.completion_params.get("extra_body") or {})
        for key, value in self.completion_params.items():
            if key in ("model", "extra_body"):
                continue
            if key in _OPENAI_CHAT_PARAMS:
                kwargs[key] = value
            else:
                extra[key] = value
        if extra:
            kwargs["extra_body"] = extra
        return kwargs


@dataclass
class AgentResult:
    """What an agent function returns (a bare float or None stand for `AgentResult(reward=...)`).
    reward: 0..1, or None to leave scoring to the trainer-side evaluator."""

    reward: float | None = None
    messages: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    termination_reason: str | None = None


#: `async def agent(task, client)`: `client` is an `openai.AsyncOpenAI` pointed at the trainer's
#: `model_base_url` with the rollout's `api_key`.
Agent = Callable[[RolloutTask, openai.AsyncOpenAI], Awaitable[AgentResult | float | None]]
