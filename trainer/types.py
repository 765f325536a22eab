"""The types that flow along openrft's training path, in the order a task meets them.

A dataset row (`env_sdk.Task`) becomes `group_size` rollouts on env servers. Every model call an env
makes goes through the gateway, which renders the prompt, asks a `GenerationBackend` for a
`Generation` under `SamplingParams`, and keeps a `CallRecord` of the exact tokens. When a rollout
ends, the scheduler scores it into a `RolloutResult`; a task's rollouts form a `GroupResult`. The
recorded calls of the groups that teach something become `Sample`s (token ids, loss mask, sampling
logprobs, advantage), and a step's samples form a `StepBatch` for the learner's GRPO update.

docs/ARCHITECTURE.md walks one task from a dataset row to the loss, naming the function at each hop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from env_sdk.models import Status, StatusCode

# --- the model side: one call through the gateway ---------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """A completion: sampled token ids (including the stop token when one ended it), the
    temperature-1 logprob of each, and why it ended: "stop" (eos / stop token) or "length"."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int | None = None  # the policy version that sampled its first token (pipelined steps)


#: Called with each token id as it is sampled.
TokenSink = Callable[[int], None]


@dataclass
class BackendStats:
    """Counters a test or benchmark can read: batches run, model forward calls, rows, tokens."""

    batches: int = 0
    forward_calls: int = 0
    rows: int = 0
    joined: int = 0  # rows that joined a batch already decoding
    prefilled_rows: int = 0  # prompts prefilled (identical prompts admitted together count once)
    prefilled_tokens: int = 0  # prompt tokens run through the model (a prefix shared by prompts counts once)
    generated_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)


@runtime_checkable
class GenerationBackend(Protocol):
    """What the gateway generates with, and the whole of what the trainer asks of it.

    A backend that samples from the learner's own model object (transformers) has a `lock`: the
    learner holds it while it changes the weights, so no batch sees half an update. A backend with
    its own copy of the model (vLLM servers) sets `needs_adapter_dir`: each step's adapter is saved
    to a directory and handed to `weights_updated`. `stats` counts model forward calls where the
    backend can (None otherwise). `close` stops what the backend started (threads, servers)."""

    needs_adapter_dir: bool
    lock: AbstractContextManager[Any] | None
    stats: BackendStats | None

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """One completion of `prompt_ids`: its token ids and their temperature-1 logprobs."""
        ...

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Called after each optimizer step; `adapter_dir` holds the new adapter when one was saved."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingBackend(GenerationBackend, Protocol):
    """A backend that can report tokens while it samples (a chat client streams their text)."""

    async def generate_streamed(self, prompt_ids: list[int], params: SamplingParams, on_token: TokenSink) -> Generation:
        """`generate`, calling `on_token(token_id)` on the caller's event loop for each token
        sampled, all of them before the result is returned."""
        ...


@dataclass
class CallRecord:
    """One chat completion choice, as the gateway recorded it: what the model saw and what it
    sampled. Training reads `prompt_ids`, `completion_ids` and `logprobs`, never the text."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    response: dict[str, Any]  # the assistant message returned (content / tool_calls)
    finish_reason: str
    policy_version: int | None = None  # the policy version that sampled it, when the backend counts them
    tool_call_errors: list[str] = field(default_factory=list)  # the parser's reasons for calls it could not read


def extends(ids: list[int], prefix: list[int]) -> bool:
    """Whether `ids` starts with `prefix`: a multi-turn call's prompt extends the previous call's
    prompt + completion when the env only appended to the conversation (then the calls train as one
    sequence, and the gateway counts no prefix mismatch)."""
    return len(ids) >= len(prefix) and ids[: len(prefix)] == prefix


# --- the env side: rollouts and groups ------------------------------------------------------


@dataclass
class RolloutResult:
    rollout_id: str
    group: int
    task_index: int
    status: Status
    reward: float | None = None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    termination_reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    calls: list[CallRecord] = field(default_factory=list)
    prefix_mismatch: bool = False
    env_url: str = ""
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status.ok and self.reward is not None

    @property
    def failure_kind(self) -> str | None:
        return None if self.ok else status_kind(self.status.code)

    def dump(self) -> dict[str, Any]:
        """The rollouts-dump record (RUN_DIR/rollouts/step_*.jsonl)."""
        return {
            "rollout_id": self.rollout_id,
            "group": self.group,
            "task_index": self.task_index,
            "reward": self.reward,
            "reason": self.reason,
            "status": {"code": self.status.code, "message": self.status.message},
            "messages": self.messages,
            "termination_reason": self.termination_reason,
            "metrics": self.metrics,
            "env_url": self.env_url,
            "attempts": self.attempts,
            "num_calls": len(self.calls),
            "prefix_mismatch": self.prefix_mismatch,
        }


@dataclass
class GroupResult:
    group: int
    task_index: int
    rollouts: list[RolloutResult]

    @property
    def finished(self) -> list[RolloutResult]:
        return [r for r in self.rollouts if r.ok]


def status_kind(code: int) -> str:
    """The metric name of a status code: `unavailable`, `score_invalid`, ... (`code_N` if unknown)."""
    try:
        return StatusCode(code).name.lower()
    except ValueError:
        return f"code_{code}"


def failure_counts(groups: Sequence[GroupResult]) -> Counter[str]:
    return Counter(r.failure_kind for g in groups for r in g.rollouts if r.failure_kind)


# --- the learner side: samples and a step's batch ------------------------------------------


@dataclass
class Sample:
    """One training sequence: `input_ids` with `loss_mask` 1 exactly on sampled tokens, the sampling
    logprob of each (`old_logprobs`, 0.0 elsewhere), all aligned, and its rollout's advantage."""

    input_ids: list[int]
    loss_mask: list[int]
    old_logprobs: list[float]
    advantage: float = 0.0
    rollout_id: str = ""
    policy_version: int | None = None  # the oldest policy version that sampled one of its tokens

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class StepBatch:
    """What one step hands the learner: the samples of the groups that trained, and the groups
    that did not (dropped: too few finished rollouts; all_equal: rewards tied), counted."""

    samples: list[Sample]
    trained_groups: int
    dropped: int
    all_equal: int
    trained_ids: set[str] = field(default_factory=set)  # the rollouts the samples come from
