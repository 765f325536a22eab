"""The tracing-gateway side of eval-protocol's remote rollout contract, served by `openrft serve`
and by the trainer's gateway.

eval-protocol's `RemoteRolloutProcessor` hands the env server a `model_base_url` on its tracing
gateway and then reads everything from that gateway, never from the env:

- `POST /logs` (or `/v1/logs`): env servers push status log records here
  (`{program, status, message, tags: ["rollout_id:<id>", ...], extras}`);
- `GET /v1/status?rollout_id=`: `{"rollout_id", "status": {"code", "message", "details"} | null,
  "extras"}`, the latest status pushed for the rollout (null until one is);
- `GET /logs?tags=rollout_id:<id>[&program=..&limit=..]`: `{"entries": [...]}`, the records pushed;
- `GET /v1/traces/pointwise?tags=rollout_id:<id>`: `{"traces": [...]}`, one trace per chat
  completion made under the rollout's URL (`input`: the request's messages and tools, `output`: the
  assistant message), which the processor turns into the row's final conversation.

`TraceStore` keeps these for the most recent `max_rollouts` rollouts (oldest forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict

from env_sdk.models import Status
from trainer.gateway.http import OPENAI_ERROR, APIError, parse_body, read_json

ROLLOUT_TAG = "rollout_id:"


class LogRecordBody(BaseModel):
    """eval-protocol's status log record."""

    model_config = ConfigDict(extra="allow")

    program: str | None = None
    status: Status | None = None
    message: str | None = None
    tags: list[str]
    extras: dict[str, Any] | None = None

    def rollout_ids(self) -> list[str]:
        return tagged_rollout_ids(self.tags)


def tagged_rollout_ids(tags: list[str]) -> list[str]:
    """The ids of the `rollout_id:<id>` tags among `tags`."""
    return [t.removeprefix(ROLLOUT_TAG) for t in tags if t.startswith(ROLLOUT_TAG)]


def parse_log_record(body: Any) -> LogRecordBody:
    """A pushed record, or an APIError (400) naming what is wrong with it."""
    record = parse_body(LogRecordBody, body, "log record")
    if not record.rollout_ids():
        raise APIError(400, "tags: no 'rollout_id:<id>' tag", param="tags")
    return record


@dataclass
class _Traced:
    entries: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] | None = None
    extras: dict[str, Any] | None = None
    traces: list[dict[str, Any]] = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class TraceStore:
    """Log records, latest status and chat traces per rollout id, bounded."""

    def __init__(self, max_rollouts: int = 10_000) -> None:
        self.max_rollouts = max_rollouts
        self._rollouts: OrderedDict[str, _Traced] = OrderedDict()

    def _get(self, rollout_id: str) -> _Traced:
        traced = self._rollouts.get(rollout_id)
        if traced is None:
            traced = self._rollouts[rollout_id] = _Traced()
            while len(self._rollouts) > self.max_rollouts:
                self._rollouts.popitem(last=False)
        return traced

    def add_log(self, record: LogRecordBody, rollout_ids: Iterable[str] | None = None) -> None:
        """Keep `record` for each rollout it names (or for `rollout_ids`)."""
        extras = dict(record.extras or {})
        entry = {
            "timestamp": extras.get("timestamp") or _now(),
            "message": record.message,
            "severity": extras.get("level", "INFO"),
            "tags": record.tags,
            "status": record.status.model_dump() if record.status is not None else None,
            "extras": extras,
            "program": record.program,
        }
        for rid in rollout_ids if rollout_ids is not None else record.rollout_ids():
            traced = self._get(rid)
            traced.entries.append(entry)
            if record.status is not None:
                traced.status, traced.extras = entry["status"], extras

    def add_trace(self, ids: dict[str, str], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  output: dict[str, Any]) -> None:
        """One chat completion made under a rollout's URL; `ids` are the path's ids by name."""
        traced = self._get(ids["rollout_id"])
        tags = [f"{name}:{value}" for name, value in ids.items()]
        trace_input: dict[str, Any] = {"messages": messages}
        if tools:
            trace_input["tools"] = tools
        traced.traces.append({"id": f"{ids['rollout_id']}-{len(traced.traces)}", "timestamp": _now(), "tags": tags,
                              "input": trace_input, "output": output})

    def status(self, rollout_id: str) -> dict[str, Any]:
        traced = self._rollouts.get(rollout_id)
        return {"rollout_id": rollout_id, "status": traced.status if traced else None,
                "extras": traced.extras if traced else None}

    def logs(self, tags: list[str], program: str | None, limit: int) -> dict[str, Any]:
        entries = [e for rid in _tagged_ids(tags) if (t := self._rollouts.get(rid)) for e in t.entries
                   if program is None or e["program"] in (None, program)]
        return {"entries": entries[-limit:] if limit > 0 else entries}

    def traces(self, tags: list[str], limit: int) -> dict[str, Any]:
        traces = [tr for rid in _tagged_ids(tags) if (t := self._rollouts.get(rid)) for tr in t.traces]
        return {"traces": traces[-limit:] if limit > 0 else traces}


def _tagged_ids(tags: list[str]) -> list[str]:
    ids = tagged_rollout_ids(tags)
    if not ids:
        raise APIError(400, "tags: give at least one 'rollout_id:<id>' tag", param="tags")
    return ids


Authorize = Callable[[Request], None]


def add_tracing_routes(app: FastAPI, store: TraceStore, authorize: Authorize, *, traces: bool = True) -> None:
    """The read side (status, logs and, with `traces`, chat traces) on `app`. The write side,
    `POST /logs`, stays the app's own: what a pushed record may do differs (see the gateway)."""

    errors: dict[int | str, dict[str, Any]] = {400: OPENAI_ERROR, 401: OPENAI_ERROR}

    @app.get("/v1/status", responses=errors)
    async def rollout_status(request: Request, rollout_id: str = Query(min_length=1)) -> dict[str, Any]:
        """eval-protocol's status read-out: the latest status pushed for the rollout, or null."""
        authorize(request)
        return store.status(rollout_id)

    @app.get("/logs", responses=errors)
    @app.get("/v1/logs", responses=errors)
    async def logs(request: Request, tags: list[str] = Query(), program: str | None = None,
                   limit: int = 100) -> dict[str, Any]:
        """The log records pushed for the rollouts named by `rollout_id:<id>` tags."""
        authorize(request)
        return store.logs(tags, program, limit)

    if traces:
        @app.get("/v1/traces/pointwise", responses=errors)
        async def pointwise(request: Request, tags: list[str] = Query(), limit: int = 100) -> dict[str, Any]:
            """One trace per chat completion made under the rollouts' URLs (eval-protocol's shape)."""
            authorize(request)
            return store.traces(tags, limit)


async def read_log_record(request: Request) -> LogRecordBody:
    return parse_log_record(await read_json(request))

