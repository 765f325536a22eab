"""The wire protocol (v1) as pydantic models.

These are the single source of truth for `protocol/schemas/*.json` (regenerate with
`python -m env_sdk.schema`). Field names follow Fireworks' eval-protocol remote rollout
format; openrft's additions are all optional, so an eval-protocol body validates as is.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROTOCOL_VERSION = "1"
#: The header on every answer of a v1 server; its value is PROTOCOL_VERSION.
PROTOCOL_HEADER = "X-OpenRFT-Protocol"
#: Endpoints answered without the bearer token (probes of load balancers; they reveal no rollout).
OPEN_PATHS = frozenset({"/health", "/version"})


class StatusCode(IntEnum):
    """gRPC codes 0-16 plus eval-protocol's 100-103."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16
    FINISHED = 100
    RUNNING = 101
    SCORE_INVALID = 102
    RESPONSE_QUALITY_ERROR = 103


#: Codes that mean "the rollout ended well"; every other terminal code is a failure.
SUCCESS_CODES = frozenset({StatusCode.OK, StatusCode.FINISHED})


class _Open(BaseModel):
    """Unknown fields are kept: peers may send more than v1 names."""

    model_config = ConfigDict(extra="allow")


class Status(_Open):
    code: int = Field(description="A StatusCode value (gRPC 0-16, or 100-103).")
    message: str = ""
    details: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code in SUCCESS_CODES

    @classmethod
    def finished(cls, message: str = "Rollout finished") -> Status:
        return cls(code=StatusCode.FINISHED, message=message)

    @classmethod
    def running(cls) -> Status:
        return cls(code=StatusCode.RUNNING, message="Rollout is running")

    @classmethod
    def error(cls, code: StatusCode, message: str) -> Status:
        return cls(code=code, message=message)


# --- OpenAI chat format -------------------------------------------------------------------


class FunctionCall(_Open):
    name: str
    arguments: str = Field(description="JSON-encoded arguments, as the OpenAI API sends them.")


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: str = Field(description="system, user, assistant or tool")
    content: str | list[dict[str, Any]] | None = ""
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class FunctionSpec(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionSpec


# --- /init --------------------------------------------------------------------------------


class RolloutMetadata(_Open):
    invocation_id: str
    experiment_id: str
    rollout_id: str = Field(min_length=1, max_length=256)
    run_id: str
    row_id: str


class InitRequest(_Open):
    """Body of `POST /init`: eval-protocol's InitRequest plus optional openrft fields."""

    completion_params: dict[str, Any] = Field(
        default_factory=dict, description="model, temperature, max_tokens, ... for the env's model calls"
    )
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    model_base_url: str | None = None
    metadata: RolloutMetadata
    api_key: str | None = None
    # openrft additions
    deadline_s: float | None = Field(
        default=None, gt=0, strict=True,  # a number, never "5" or true (the schema says number)
        description="openrft: seconds the env may spend before DEADLINE_EXCEEDED",
    )
    task_metadata: dict[str, Any] | None = Field(
        default=None, description="openrft: the dataset row's `metadata` (never its ground_truth)"
    )


class InitResponse(BaseModel):
    status: Literal["accepted"] = "accepted"
    rollout_id: str


# --- /status ------------------------------------------------------------------------------


class StatusResponse(_Open):
    """Body of `GET /status`. `terminated`, `status`, `info` are eval-protocol's; the rest openrft's."""

    terminated: bool
    status: Status | None = None
    info: dict[str, Any] | None = None
    reward: float | None = None
    metrics: dict[str, float] | None = None
    termination_reason: str | None = None
    messages: list[Message] | None = Field(
        default=None, description="openrft: the final conversation as the env saw it"
    )


class Health(BaseModel):
    status: Literal["ok", "draining"] = "ok"
    protocol_version: str = PROTOCOL_VERSION
    capacity: int
    in_flight: int
    available: int


# --- evaluation ---------------------------------------------------------------------------


class EvaluationResult(BaseModel):
    """What an evaluator or grader returns. A score outside [0, 1] or NaN is rejected."""

    score: float
    reason: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)

    @field_validator("score")
    @classmethod
    def _score_in_range(cls, v: float) -> float:
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"score must be within [0, 1], got {v!r}")
        return v


class Task(_Open):
    """One dataset row: what a rollout starts from. ground_truth stays on the trainer side."""

    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    ground_truth: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)


# --- openrft endpoints beyond eval-protocol's (added for /status/batch, /cancel, /version) --


class StatusBatchRequest(BaseModel):
    """Body of `POST /status/batch`: long-poll many rollouts at once."""

    rollout_ids: list[str] = Field(min_length=1, max_length=10_000)
    wait_s: float = Field(
        default=0.0, ge=0, le=60, strict=True,
        description="return as soon as one listed rollout is terminal, or after wait_s",
    )
    linger_s: float = Field(
        default=0.0, ge=0, le=1, strict=True,
        description="after the first wakes a waiting call, gather finishes this much longer",
    )


class StatusBatchResponse(BaseModel):
    statuses: dict[str, StatusResponse] = Field(description="the TERMINAL rollouts among rollout_ids, by id")
    unknown: list[str] = Field(default_factory=list, description="ids the server does not know (404 for /status)")


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the offending field, e.g. metadata.rollout_id")
    message: str


#: Most InitRequests in one `POST /init/batch`.
INIT_BATCH_MAX = 1_000
#: The `VersionResponse.capabilities` entry of a server that serves `POST /init/batch`.
CAP_INIT_BATCH = "init_batch"


class InitBatchRequest(BaseModel):
    """Body of `POST /init/batch` (optional, advertised as capability `init_batch`): many `/init`s
    in one request. Each item is validated and admitted on its own, in order, as its own `/init` would be."""

    requests: list[Any] = Field(
        min_length=1, max_length=INIT_BATCH_MAX,
        description="InitRequest objects (schemas/InitRequest.json). Each is validated on its own: an invalid "
                    "one gets its own 422 result and does not fail the request",
    )


class InitBatchItem(BaseModel):
    """What `POST /init` would have answered for one item of an `InitBatchRequest`."""

    status_code: int = Field(description="202 started, 200 already held, 422 invalid, 429 at capacity, "
                                         "503 shutting down: the HTTP status `POST /init` would have answered")
    rollout_id: str | None = Field(default=None, description="the item's metadata.rollout_id, when it has one")
    detail: str | None = Field(default=None, description="for an error: ErrorResponse.detail")
    errors: list[FieldError] | None = Field(default=None, description="for 422: ErrorResponse.errors")
    retry_after: float | None = Field(default=None, description="for 429 / 503: the Retry-After, in seconds")


class InitBatchResponse(BaseModel):
    results: list[InitBatchItem] = Field(description="one per request, in the order sent")


class CancelResponse(BaseModel):
    rollout_id: str
    cancelled: bool = Field(description="true when this call stopped a running rollout")


class VersionResponse(BaseModel):
    protocol_version: str = PROTOCOL_VERSION
    name: str = Field(description="the env server's name")
    sdk: str = Field(default="", description="implementation and version, e.g. openrft-env-sdk/0.1.0")
    capabilities: list[str] = Field(default_factory=list,
                                    description="optional features served, e.g. init_batch (POST /init/batch)")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    detail: str
    errors: list[FieldError] | None = None
