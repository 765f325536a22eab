"""The rollouts of one env server: admission under a concurrency limit, each rollout as an asyncio
task under its deadline, the agent's result turned into the terminal StatusResponse, and the reads
and waits the endpoints answer from. No HTTP here: `env_sdk.server` maps requests onto this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import openai

from env_sdk.agent import Agent, AgentResult, RolloutTask
from env_sdk.models import InitRequest, Status, StatusCode, StatusResponse
from env_sdk.status_push import StatusPusher, status_record

# The name SPEC section 5 gives for the server's log (rollout starts, ends, agent tracebacks).
logger = logging.getLogger("env_sdk.server")

#: Placeholder base URL when an InitRequest has no model_base_url: model calls then fail with a
#: connection error whose message names the missing field.
MISSING_MODEL_URL = "http://model-base-url-missing.invalid/v1"
#: What a refused /init (429 at capacity, 503 draining) tells the client to wait, in seconds.
RETRY_AFTER_S = 1

_RUNNING_BODY = StatusResponse(terminated=False, status=Status.running(), info={}).model_dump_json(
    exclude_none=True
).encode()


@dataclass
class _Rollout:
    rollout_id: str
    request: InitRequest
    deadline_s: float
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    body: bytes = b""  # the terminal StatusResponse as JSON, set once
    cancel_requested: bool = False


def _ended(code: StatusCode, message: str, info: dict[str, Any] | None = None) -> StatusResponse:
    """A terminal status without a result: the rollout failed, was cancelled or timed out."""
    return StatusResponse(terminated=True, status=Status.error(code, message), info=info or {})


def _check_reward(reward: Any) -> str | None:
    """None when `reward` is a valid score, else why not."""
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        return f"reward must be a float in [0, 1], got {type(reward).__name__} {reward!r}"
    if math.isnan(reward) or not 0.0 <= reward <= 1.0:
        return f"reward must be within [0, 1], got {reward!r}"
    return None


def result_status(result: Any) -> StatusResponse:
    """The terminal StatusResponse for what the agent returned."""
    if result is None or (isinstance(result, (int, float)) and not isinstance(result, bool)):
        result = AgentResult(reward=result)
    if not isinstance(result, AgentResult):
        return _ended(StatusCode.INTERNAL, f"agent returned {type(result).__name__}; expected AgentResult, float or None")
    why = None if result.reward is None else _check_reward(result.reward)
    return StatusResponse(
        terminated=True,
        status=Status.finished() if why is None else Status.error(StatusCode.SCORE_INVALID, why),
        info=result.info,
        reward=None if result.reward is None or why is not None else float(result.reward),
        metrics=result.metrics or None,
        termination_reason=result.termination_reason,
        messages=result.messages,  # type: ignore[arg-type]
    )


class _LazyModelClient:
    """Stands in for a rollout's `openai.AsyncOpenAI` and builds it on first use: building one
    costs 25-90 us of httpx URL parsing and leaves cyclic garbage, and many agents (scoring only,
    no-op) never call the model."""

    __slots__ = ("_lazy_client", "_lazy_request", "_lazy_server")

    def __init__(self, server: EnvServer, request: InitRequest) -> None:
        self._lazy_server = server
        self._lazy_request = request
        self._lazy_client: openai.AsyncOpenAI | None = None

    def _lazy_get(self) -> openai.AsyncOpenAI:
        if self._lazy_client is None:
            self._lazy_client = self._lazy_server.model_client(self._lazy_request)
        return self._lazy_client

    def __getattr__(self, name: str) -> Any:  # only called for names the proxy itself lacks
        return getattr(self._lazy_get(), name)

    async def __aenter__(self) -> openai.AsyncOpenAI:
        return await self._lazy_get().__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._lazy_get().__aexit__(*exc_info)  # type: ignore[arg-type]


class EnvServer:
    """Every rollout of one env server, by rollout_id, until its result expires."""

    def __init__(self, agent: Agent, *, max_concurrency: int, deadline_s: float, result_ttl_s: float,
                 pusher: StatusPusher | None = None) -> None:
        self.agent = agent
        self.pusher = pusher
        self.max_concurrency = max_concurrency
        self.deadline_s = deadline_s
        self.result_ttl_s = result_ttl_s
        self.rollouts: dict[str, _Rollout] = {}
        self.running = 0
        self.draining = False
        # Batch long-polls waiting for any of their ids to finish: future -> ids.
        self.waiters: dict[asyncio.Future[None], frozenset[str]] = {}
        self._http: httpx.AsyncClient | None = None

    # --- model client ---------------------------------------------------------------------

    def http(self) -> httpx.AsyncClient:
        """One pooled connection set shared by every rollout's OpenAI client."""
        if self._http is None:
            limits = httpx.Limits(max_connections=max(self.max_concurrency, 16),
                                  max_keepalive_connections=max(self.max_concurrency, 16))
            self._http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))
        return self._http

    def model_client(self, req: InitRequest) -> openai.AsyncOpenAI:
        # the trainer's W3C trace context (metadata.traceparent) goes back on every model call
        traceparent = (req.metadata.model_extra or {}).get("traceparent")
        return openai.AsyncOpenAI(
            base_url=req.model_base_url or MISSING_MODEL_URL,
            api_key=req.api_key or "EMPTY",
            http_client=self.http(),
            default_headers={"traceparent": traceparent} if isinstance(traceparent, str) else None,
        )

    async def aclose(self) -> None:
        self.draining = True
        tasks = [r.task for r in self.rollouts.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.pusher is not None:
            await self.pusher.aclose()

    # --- what the endpoints ask -----------------------------------------------------------

    def admit(self, req: InitRequest) -> tuple[int, str | None]:
        """What `/init` answers for a valid request: its status code and, for a refusal, why.
        Starts the rollout when the code is 202."""
        if req.metadata.rollout_id in self.rollouts:
            return 200, None
        if self.draining:
            return 503, "env server is shutting down"
        if self.running >= self.max_concurrency:
            return 429, f"at capacity: {self.running}/{self.max_concurrency} rollouts running"
        self.start(req)
        return 202, None

    async def status_body(self, rollout_id: str, wait_s: float) -> bytes | None:
        """The rollout's StatusResponse as JSON (None: unknown id); with wait_s > 0, once it is
        terminal or wait_s passed."""
        r = self.rollouts.get(rollout_id)
        if r is None:
            return None
        if wait_s > 0 and not r.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(r.done.wait(), wait_s)
        return r.body if r.done.is_set() else _RUNNING_BODY

    async def settled(self, ids: list[str], wait_s: float, linger_s: float) -> tuple[list[_Rollout], list[str]]:
        """(the terminal rollouts among ids, the ids never seen). With wait_s > 0 and none of either
        yet, waits until one finishes (then gathers more for linger_s) or wait_s passed."""

        def look() -> tuple[list[_Rollout], list[str]]:
            done = [r for i in ids if (r := self.rollouts.get(i)) is not None and r.done.is_set()]
            return done, [i for i in ids if i not in self.rollouts]

        done, unknown = look()
        if done or unknown or wait_s <= 0:
            return done, unknown
        t0 = time.monotonic()
        await self._wait_any(frozenset(ids), wait_s)
        linger = min(linger_s, wait_s - (time.monotonic() - t0))
        if linger > 0:  # a bounded gather window: one answer for a burst of finishes
            await asyncio.sleep(linger)
        return look()

    async def cancel(self, rollout_id: str) -> bool | None:
        """Stop a running rollout (its status becomes CANCELLED): whether it was stopped; None for
        an unknown id. A terminal rollout is left as it is."""
        r = self.rollouts.get(rollout_id)
        if r is None:
            return None
        if r.done.is_set() or r.task is None:
            return False
        r.cancel_requested = True
        r.task.cancel()
        # Let the agent unwind so /status reads CANCELLED right after this answer.
        await asyncio.wait({r.task}, timeout=5.0)
        logger.info("rollout %s cancelled by the client", rollout_id)
        return True

    # --- rollouts -------------------------------------------------------------------------

    def start(self, req: InitRequest) -> _Rollout:
        rid = req.metadata.rollout_id
        r = _Rollout(rollout_id=rid, request=req, deadline_s=req.deadline_s or self.deadline_s)
        self.rollouts[rid] = r
        self.running += 1
        r.task = asyncio.create_task(self._run(r), name=f"rollout-{rid}")
        logger.info("rollout %s started (deadline %.1fs)", rid, r.deadline_s)
        return r

    async def _run(self, r: _Rollout) -> None:
        req = r.request
        timeout = asyncio.timeout(r.deadline_s)
        try:
            task = RolloutTask(
                messages=[m.model_dump(exclude_none=True) for m in req.messages or ()],
                tools=req.tools,
                metadata=req.metadata,
                completion_params=dict(req.completion_params),
                task_metadata=dict(req.task_metadata or {}),
            )
            async with timeout:
                result = await self.agent(task, cast(openai.AsyncOpenAI, _LazyModelClient(self, req)))
            status = result_status(result)
        except asyncio.CancelledError:
            if not r.cancel_requested:
                self._finish(r, _ended(StatusCode.UNAVAILABLE, "env server shutting down"))
                raise
            status = _ended(StatusCode.CANCELLED, "cancelled by the client")
        except TimeoutError as exc:
            if not timeout.expired():
                status = self._crash(r, exc)
            else:
                status = _ended(StatusCode.DEADLINE_EXCEEDED, f"rollout exceeded its deadline of {r.deadline_s:g}s")
        except (Exception, SystemExit) as exc:  # sys.exit() in an agent or tool ends its rollout, not the server
            status = self._crash(r, exc)
        if r.cancel_requested and status.status is not None and status.status.code != StatusCode.CANCELLED:
            status = _ended(StatusCode.CANCELLED, "cancelled by the client")
        self._finish(r, status)

    def _crash(self, r: _Rollout, exc: BaseException) -> StatusResponse:
        logger.error("rollout %s: agent raised %s: %s", r.rollout_id, type(exc).__name__, exc, exc_info=exc)
        return _ended(StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", {"exception": type(exc).__name__})

    def _finish(self, r: _Rollout, status: StatusResponse) -> None:
        if r.done.is_set():
            return
        try:
            r.body = status.model_dump_json(exclude_none=True).encode()
        except ValueError as exc:  # e.g. a metric that does not serialise
            r.body = _ended(StatusCode.INTERNAL, f"agent result is not serialisable: {exc}").model_dump_json().encode()
        r.done.set()
        self.running -= 1
        if self.pusher is not None:
            self.pusher.push(status_record(r.request, status, logger_name=logger.name), r.request.api_key)
        elapsed = time.monotonic() - r.started
        code = status.status.code if status.status else None
        logger.info("rollout %s finished: code=%s reward=%s in %.3fs", r.rollout_id, code, status.reward, elapsed)
        for fut, ids in self.waiters.items():
            if r.rollout_id in ids and not fut.done():
                fut.set_result(None)
        asyncio.get_running_loop().call_later(self.result_ttl_s, self._evict, r)

    def _evict(self, r: _Rollout) -> None:
        if self.rollouts.get(r.rollout_id) is r:
            del self.rollouts[r.rollout_id]

    async def _wait_any(self, ids: frozenset[str], wait_s: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[fut] = ids
        try:
            await asyncio.wait_for(fut, wait_s)
        except TimeoutError:
            pass
        finally:
            del self.waiters[fut]
