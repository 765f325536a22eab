"""Rollout scheduler: groups of rollouts over one or more env servers, to a terminal result each.

For every rollout: open it on the model endpoint (the gateway, or a plain OpenAI-compatible URL
for evaluation) -> `POST /init` on an env chosen by the router -> wait for a terminal status,
from the env's batched long-poll `POST /status/batch`, or for an env without /status (eval-protocol
servers) from the gateway's `/logs` push -> at the deadline, cancel it on the env -> close
it on the endpoint (its call records come back) -> score it.

Nothing waits forever: each attempt has the rollout deadline, and only retryable failures are
retried, a bounded number of times, each on the next env the router picks. Retryable: init
refused for capacity (429/503), a 5xx, an unreachable env, an env lost while waiting, or a
terminal status UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED / NOT_FOUND (the env restarted and
forgot the rollout). A retry is a fresh rollout id: the env is idempotent on the id, and the
first attempt's model calls must not be mixed into the second's record.

One waiter task per env polls every rollout in flight there with a single long-poll request, so
thousands of rollouts cost one HTTP request per wave, not one per rollout per interval.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from env_sdk import (
    AuthError,
    BadRequestError,
    CapacityError,
    EnvClient,
    EnvError,
    EnvHTTPError,
    EnvProtocolError,
    EnvUnreachableError,
    NotFoundError,
    ServerError,
)
from env_sdk.models import InitRequest, RolloutMetadata, Status, StatusCode, StatusResponse, Task
from trainer.config import EnvEndpoint
from trainer.rewards import Evaluator, ScoreInvalid, score_rollout

logger = logging.getLogger("trainer.scheduler")

RETRYABLE_CODES = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED, StatusCode.ABORTED, StatusCode.NOT_FOUND}
)
#: How long an env that refused connections is skipped by the router.
DOWN_FOR_S = 10.0
#: How long an env that stayed at capacity (429/503) or failed (5xx) is skipped.
BUSY_FOR_S = 2.0
#: How long a POST /cancel may take before its env counts as down (it holds a step past the deadline).
CANCEL_TIMEOUT_S = 2.0
#: How often a down env's /health is tried while every env is down.
REVIVE_POLL_S = 0.5
#: Final failure codes that mean the env side is broken (unreachable, 5xx, at capacity through the
#: retries, off-spec answers, forgot the rollout, refused the request or the token), not the agent
#: or its score: the circuit breaker counts these in a row.
INFRA_CODES = frozenset({
    StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED, StatusCode.DATA_LOSS, StatusCode.NOT_FOUND,
    StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED, StatusCode.INVALID_ARGUMENT,
    StatusCode.FAILED_PRECONDITION,
})
#: Debounce before a waiter sends a long-poll, so a burst of new rollouts shares one request.
POLL_DEBOUNCE_S = 0.005


class EnvsUnreachable(RuntimeError):
    """No configured env server answers /health; the message names each URL and its error."""


class CircuitOpen(RuntimeError):
    """Too many rollouts in a row failed for infrastructure reasons; the message says which and why."""


# --- the model side of a rollout ----------------------------------------------------------


class ModelEndpoint(Protocol):
    """Where envs send their model calls for a rollout."""

    def open(self, metadata: RolloutMetadata) -> tuple[str, str | None]:
        """Register the rollout; return (model_base_url, api_key) for its InitRequest."""
        ...

    def logged(self, rollout_id: str) -> asyncio.Event | None:
        """An event set when the env pushed the rollout's terminal status (eval-protocol /logs)."""
        ...

    def logged_status(self, rollout_id: str) -> Status | None: ...

    def close(self, rollout_id: str) -> tuple[list[Any], bool]:
        """Stop accepting calls for the rollout; return (call records, prefix_mismatch)."""
        ...


class GatewayEndpoint:
    """The trainer's own gateway: calls are recorded token by token for training."""

    def __init__(self, gateway: Any, public_url: str) -> None:
        self.gateway = gateway
        self.public_url = public_url

    def open(self, metadata: RolloutMetadata) -> tuple[str, str | None]:
        return self.gateway.open_rollout(metadata, self.public_url)

    def logged(self, rollout_id: str) -> asyncio.Event | None:
        return self.gateway.record(rollout_id).logged

    def logged_status(self, rollout_id: str) -> Status | None:
        return self.gateway.record(rollout_id).logged_status

    def close(self, rollout_id: str) -> tuple[list[Any], bool]:
        record = self.gateway.close_rollout(rollout_id)
        return list(record.calls), bool(record.prefix_mismatch)


class ExternalEndpoint:
    """Any OpenAI-compatible URL (evaluation only): envs call it directly, nothing is recorded."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url, self.api_key = url, api_key

    def open(self, metadata: RolloutMetadata) -> tuple[str, str | None]:
        return self.url, self.api_key

    def logged(self, rollout_id: str) -> asyncio.Event | None:
        return None

    def logged_status(self, rollout_id: str) -> Status | None:
        return None

    def close(self, rollout_id: str) -> tuple[list[Any], bool]:
        return [], False


# --- env servers ----------------------------------------------------------------------------


@dataclass
class _Waiter:
    """Per env: rollouts in flight there, and the long-polls that watch them."""

    pending: dict[str, asyncio.Future[StatusResponse]] = field(default_factory=dict)
    unpolled: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    polls: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class EnvSlot:
    url: str
    client: EnvClient
    token: str | None = None
    wait: str = "auto"  # "poll" | "logs" once probed
    in_flight: int = 0
    down_until: float = 0.0
    waiter: _Waiter = field(default_factory=_Waiter)
    reviving: asyncio.Task[None] | None = None  # the one /health watch while every env is down

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until


class EnvPool:
    """The env servers of a run: health probe at start, routing, and batched waiting."""

    def __init__(self, endpoints: Sequence[EnvEndpoint], *, routing: str = "least_loaded", poll_s: float = 2.0,
                 max_connections: int = 256) -> None:
        self.slots = [
            EnvSlot(e.url.rstrip("/"), EnvClient(e.url, token=e.token, max_connections=max_connections),
                    token=e.token, wait=e.wait)
            for e in endpoints
        ]
        self.routing = routing
        self.poll_s = poll_s
        self._rr = itertools.cycle(range(len(self.slots)))

    async def probe(self, timeout_s: float = 5.0) -> list[str]:
        """GET /health on every env. Raises EnvsUnreachable if none answers; returns warnings
        for those that do not (they are marked down and skipped while down). An env whose /health
        is openrft's is polled ("poll"). One without it (404, or a web app's own liveness route)
        may still serve /status (a server written from the SPEC's two required endpoints) or not
        (eval-protocol servers): with wait "auto" its first rollout's first /status answer decides
        (`settle_wait`)."""

        async def one(slot: EnvSlot) -> str | None:
            try:
                async with EnvClient(slot.url, token=slot.token, timeout=timeout_s, max_retries=1) as probe:
                    await probe.health()
            except (NotFoundError, EnvProtocolError) as exc:
                if slot.wait == "auto":
                    found = "has no /health" if isinstance(exc, NotFoundError) else "has a /health of its own"
                    logger.info("env %s %s: its first /status answer tells whether it is polled "
                                "or waited for by /logs pushes", slot.url, found)
                return None
            except (EnvError, OSError) as exc:
                slot.down_until = time.monotonic() + DOWN_FOR_S
                return f"env {slot.url} is unreachable: {exc}"
            if slot.wait == "auto":
                slot.wait = "poll"
            return None

        results = await asyncio.gather(*(one(s) for s in self.slots))
        problems = [r for r in results if r]
        if len(problems) == len(self.slots):
            raise EnvsUnreachable("no env server answers GET /health:\n  " + "\n  ".join(problems))
        return problems

    async def settle_wait(self, slot: EnvSlot, rollout_id: str) -> StatusResponse | None:
        """For an env whose wait mode is still "auto": one GET /status of a rollout it just accepted.
        A StatusResponse means it serves /status: polled from now on (the answer is returned).
        404/405 or an answer that is not a StatusResponse means it does not (eval-protocol servers):
        its rollouts end by the gateway's /logs push only. Other errors leave the mode undecided."""
        try:
            status = await slot.client.status(rollout_id)
        except (NotFoundError, EnvProtocolError) as exc:
            self._decide(slot, "logs", f"serves no /status ({type(exc).__name__}: {exc})")
            return None
        except EnvHTTPError as exc:
            if exc.status_code != 405:
                raise
            self._decide(slot, "logs", "serves no GET /status (405)")
            return None
        self._decide(slot, "poll", "serves /status")
        return status

    @staticmethod
    def _decide(slot: EnvSlot, wait: str, why: str) -> None:
        if slot.wait == "auto":
            slot.wait = wait
            if wait == "poll":
                logger.info("env %s %s: its rollouts are polled", slot.url, why)
            else:
                logger.warning("env %s %s: its rollouts end by the gateway's /logs pushes only", slot.url, why)

    def pick(self, avoid: EnvSlot | None = None) -> EnvSlot:
        """The env for the next attempt: up ones only (any, if all are down), `avoid` (where the
        previous attempt failed) only if no other is up; least loaded or round robin among them."""
        up = [s for s in self.slots if s.up and s is not avoid] or [s for s in self.slots if s.up]
        if not up:  # all down: try the one that has been down longest
            return min(self.slots, key=lambda s: s.down_until)
        if self.routing == "round_robin":
            for _ in range(len(self.slots)):
                slot = self.slots[next(self._rr)]
                if slot in up:
                    return slot
        return min(up, key=lambda s: s.in_flight)

    def mark_down(self, slot: EnvSlot, seconds: float = DOWN_FOR_S) -> None:
        slot.down_until = max(slot.down_until, time.monotonic() + seconds)

    async def wait_up(self, slot: EnvSlot) -> None:
        """Every env is down and `slot` comes back first: wait until its down time is over or,
        sooner, its /health answers again (a restarted env is used at once). Retries wait here
        instead of spending themselves on a dead env in a second; all share one /health watch."""
        if slot.reviving is None or slot.reviving.done():
            slot.reviving = asyncio.create_task(self._revive(slot), name=f"revive {slot.url}")
        await asyncio.shield(slot.reviving)

    async def _revive(self, slot: EnvSlot) -> None:
        while not slot.up:
            try:
                async with asyncio.timeout(REVIVE_POLL_S):
                    await slot.client.health()
            except (EnvHTTPError, EnvProtocolError):  # it answers (eval-protocol: no /health, or its own): it is up
                pass
            except (EnvError, OSError, TimeoutError):
                await asyncio.sleep(min(REVIVE_POLL_S, max(0.0, slot.down_until - time.monotonic())))
                continue
            slot.down_until = 0.0

    # --- waiting ----------------------------------------------------------------------------

    def watch(self, slot: EnvSlot, rollout_id: str) -> asyncio.Future[StatusResponse]:
        """A future resolved with the rollout's terminal status (or an EnvError while waiting)."""
        w = slot.waiter
        fut: asyncio.Future[StatusResponse] = asyncio.get_running_loop().create_future()
        w.pending[rollout_id] = fut
        w.unpolled.add(rollout_id)
        w.wake.set()
        if w.task is None or w.task.done():
            w.task = asyncio.create_task(self._wait_loop(slot), name=f"waiter {slot.url}")
        return fut

    def unwatch(self, slot: EnvSlot, rollout_id: str) -> None:
        slot.waiter.pending.pop(rollout_id, None)
        slot.waiter.unpolled.discard(rollout_id)

    async def _wait_loop(self, slot: EnvSlot) -> None:
        w = slot.waiter
        while True:
            await w.wake.wait()
            w.wake.clear()
            await asyncio.sleep(POLL_DEBOUNCE_S)
            ids = [rid for rid in w.unpolled if rid in w.pending]
            w.unpolled.clear()
            if ids:
                task = asyncio.create_task(self._poll(slot, ids))
                w.polls.add(task)
                task.add_done_callback(w.polls.discard)

    async def _poll(self, slot: EnvSlot, ids: list[str]) -> None:
        w = slot.waiter
        try:
            found = await slot.client.wait_many(ids, timeout_s=self.poll_s)
        except (EnvProtocolError, ServerError):
            # The env is up but this answer is unusable (garbled, a 5xx, or one rollout's status
            # breaks the schema): ask for each rollout alone, so only a rollout whose own status is
            # bad fails, and finished rollouts are not thrown away with the batch.
            found = await self._poll_each(slot, ids)
            if not found:  # no long-poll held this one: do not spin against a broken batch endpoint
                await asyncio.sleep(min(self.poll_s, 1.0))
        except (EnvError, OSError) as exc:
            for rid in ids:
                fut = w.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(exc if isinstance(exc, EnvError) else EnvUnreachableError(str(exc)))
            return
        for rid, st in found.items():
            fut = w.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(st)
        rest = [rid for rid in ids if rid in w.pending]
        if rest:
            w.unpolled.update(rest)
            w.wake.set()

    async def _poll_each(self, slot: EnvSlot, ids: list[str]) -> dict[str, StatusResponse]:
        """GET /status per rollout (no long-poll); a rollout whose own answer fails gets the error."""
        w = slot.waiter

        async def one(rid: str) -> tuple[str, StatusResponse | None]:
            try:
                st = await slot.client.status(rid)
            except (EnvError, OSError) as exc:
                fut = w.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(exc if isinstance(exc, EnvError) else EnvUnreachableError(str(exc)))
                return rid, None
            return rid, st if st.terminated else None

        answers = await asyncio.gather(*(one(rid) for rid in ids))
        return {rid: st for rid, st in answers if st is not None}

    async def aclose(self) -> None:
        for slot in self.slots:
            w = slot.waiter
            tasks = [t for t in [w.task, *w.polls, slot.reviving] if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await slot.client.aclose()


# --- results --------------------------------------------------------------------------------


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
    calls: list[Any] = field(default_factory=list)
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


class _Attempt(Exception):
    """An attempt failed with `status`; `retry` says whether another attempt may help."""

    def __init__(self, status: Status, retry: bool) -> None:
        super().__init__(status.message)
        self.status, self.retry = status, retry


def _error_status(exc: EnvError) -> tuple[Status, bool]:
    """Client error -> (status, retryable)."""
    if isinstance(exc, EnvUnreachableError):
        return Status.error(StatusCode.UNAVAILABLE, str(exc)), True
    if isinstance(exc, CapacityError):
        return Status.error(StatusCode.RESOURCE_EXHAUSTED, str(exc)), True
    if isinstance(exc, ServerError):
        return Status.error(StatusCode.UNAVAILABLE, str(exc)), True
    if isinstance(exc, AuthError):
        return Status.error(StatusCode.UNAUTHENTICATED, str(exc)), False
    if isinstance(exc, NotFoundError):
        return Status.error(StatusCode.NOT_FOUND, str(exc)), True
    if isinstance(exc, BadRequestError):
        return Status.error(StatusCode.INVALID_ARGUMENT, str(exc)), False
    if isinstance(exc, EnvProtocolError):
        return Status.error(StatusCode.DATA_LOSS, str(exc)), False
    return Status.error(StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"), False


# --- the scheduler --------------------------------------------------------------------------


class RolloutScheduler:
    def __init__(
        self,
        pool: EnvPool,
        endpoint: ModelEndpoint,
        *,
        completion_params: dict[str, Any],
        evaluator: Evaluator | None,
        deadline_s: float,
        max_retries: int,
        max_in_flight: int,
        run_id: str,
        experiment_id: str = "openrft",
        max_consecutive_failures: int = 0,
    ) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.completion_params = completion_params
        self.evaluator = evaluator
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.semaphore = asyncio.Semaphore(max_in_flight)
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.retries = 0
        self.retried: Counter[str] = Counter()  # the failures that were retried, by kind
        self.max_consecutive_failures = max_consecutive_failures  # 0: no circuit breaker
        self.consecutive_failures = 0

    async def run_groups(self, tasks: Sequence[tuple[int, Task]], group_size: int, step: int,
                         on_rollout: Callable[[RolloutResult], None] | None = None) -> list[GroupResult]:
        """Run `group_size` rollouts of each (dataset index, task); every rollout ends.
        `on_rollout` is called as each one ends (progress display)."""
        nonce = uuid.uuid4().hex[:6]  # a rerun of a step (after --resume) must not reuse ids

        async def one(task: Task, index: int, g: int, k: int) -> RolloutResult:
            result = await self.run_rollout(task, task_index=index, group=g, rollout_id=f"s{step}-g{g}-r{k}-{nonce}")
            self._breaker(result)
            if on_rollout is not None:
                on_rollout(result)
            return result

        jobs = [asyncio.ensure_future(one(task, index, g, k)) for g, (index, task) in enumerate(tasks)
                for k in range(group_size)]
        try:
            results = await asyncio.gather(*jobs)
        except BaseException:  # the breaker opened (or we were cancelled): stop the other rollouts
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        return [
            GroupResult(g, index, list(results[g * group_size : (g + 1) * group_size]))
            for g, (index, _) in enumerate(tasks)
        ]

    def _breaker(self, result: RolloutResult) -> None:
        """Count rollouts that failed for an infrastructure reason in a row; raise CircuitOpen at the limit."""
        if result.ok or result.status.code not in INFRA_CODES:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.max_consecutive_failures and self.consecutive_failures >= self.max_consecutive_failures:
            raise CircuitOpen(
                f"{self.consecutive_failures} rollouts in a row failed for infrastructure reasons "
                f"(rollout.max_consecutive_failures = {self.max_consecutive_failures}); the last on "
                f"{result.env_url} after {result.attempts} attempt(s): {result.failure_kind}: {result.status.message}"
            )

    async def run_rollout(self, task: Task, *, task_index: int, group: int, rollout_id: str) -> RolloutResult:
        """One rollout to its end, with bounded retries of retryable failures."""
        last: _Attempt | None = None
        slot: EnvSlot | None = None
        for attempt in range(self.max_retries + 1):
            rid = rollout_id if attempt == 0 else f"{rollout_id}.{attempt}"
            slot = self.pool.pick(avoid=slot)
            if not slot.up:  # every env is down: wait for one to answer again rather than spin
                await self.pool.wait_up(slot)
            try:
                async with self.semaphore:
                    result = await self._attempt(task, rid, slot, task_index=task_index, group=group)
                result.attempts = attempt + 1
                return result
            except _Attempt as failed:
                last = failed
                if not failed.retry or attempt == self.max_retries:
                    break
                self.retries += 1
                self.retried[status_kind(failed.status.code)] += 1
                logger.info("rollout %s on %s failed (%s), retrying", rid, slot.url, failed.status.message)
        assert last is not None and slot is not None
        return RolloutResult(rid, group, task_index, last.status, env_url=slot.url, attempts=attempt + 1)

    def _metadata(self, rid: str, task_index: int) -> RolloutMetadata:
        return RolloutMetadata(invocation_id=self.run_id, experiment_id=self.experiment_id, rollout_id=rid,
                               run_id=self.run_id, row_id=str(task_index))

    async def _attempt(self, task: Task, rid: str, slot: EnvSlot, *, task_index: int, group: int) -> RolloutResult:
        metadata = self._metadata(rid, task_index)
        base_url, api_key = self.endpoint.open(metadata)
        request = InitRequest(
            completion_params=self.completion_params,
            messages=task.messages,
            tools=task.tools,
            model_base_url=base_url,
            metadata=metadata,
            api_key=api_key,
            deadline_s=self.deadline_s,
            task_metadata=task.metadata or None,
        )
        slot.in_flight += 1
        try:
            status = await self._start_and_wait(request, slot)
        finally:
            slot.in_flight -= 1
            calls, mismatch = self.endpoint.close(rid)
        result = RolloutResult(rid, group, task_index, status.status or Status.finished(), calls=calls,
                               prefix_mismatch=mismatch, env_url=slot.url, info=dict(status.info or {}),
                               termination_reason=status.termination_reason, metrics=dict(status.metrics or {}))
        result.messages = (
            [m.model_dump(exclude_none=True) for m in status.messages] if status.messages else _conversation(calls)
        )
        if not result.status.ok:
            if result.status.code in RETRYABLE_CODES:
                raise _Attempt(result.status, retry=True)
            return result
        try:
            score = await score_rollout(self.evaluator, result.messages, task.ground_truth, result.info, status.reward)
        except ScoreInvalid as exc:
            result.status = Status.error(StatusCode.SCORE_INVALID, str(exc))
            return result
        result.reward, result.reason = score.reward, score.reason
        result.metrics.update(score.metrics)
        return result

    async def _start_and_wait(self, request: InitRequest, slot: EnvSlot) -> StatusResponse:
        """Init on the env, then the first of: batched long-poll, /logs push, deadline. The deadline
        counts from the env's acceptance, as the env counts it: time spent waiting out its 429s
        (bounded too, by one more deadline) is not taken from the rollout's own time."""
        rid = request.metadata.rollout_id
        try:
            async with asyncio.timeout(self.deadline_s):
                try:
                    await slot.client.init(request)
                except EnvError as exc:
                    if isinstance(exc, EnvUnreachableError):
                        self.pool.mark_down(slot)
                    elif isinstance(exc, (CapacityError, ServerError)):
                        self.pool.mark_down(slot, BUSY_FOR_S)
                    raise _Attempt(*_error_status(exc)) from None
            async with asyncio.timeout(self.deadline_s):
                return await self._wait(slot, rid)
        except TimeoutError:
            await self._cancel(slot, rid)
            return StatusResponse(terminated=True, status=Status.error(
                StatusCode.DEADLINE_EXCEEDED, f"rollout not terminal after its deadline of {self.deadline_s:g}s; cancelled"))

    async def _wait(self, slot: EnvSlot, rid: str) -> StatusResponse:
        if slot.wait == "auto":
            try:
                first = await self.pool.settle_wait(slot, rid)
            except EnvError as exc:
                status, retry = _error_status(exc)
                raise _Attempt(Status.error(StatusCode(status.code), f"while waiting: {status.message}"),
                               retry=retry) from None
            if first is not None and first.terminated:
                return first
        polled = self.pool.watch(slot, rid) if slot.wait != "logs" else None
        # An env that serves /status is believed there only: a /logs push carries no proof of who sent
        # it, so another rollout's env could otherwise end this rollout early.
        logged = self.endpoint.logged(rid) if slot.wait != "poll" else None
        pushed = asyncio.ensure_future(logged.wait()) if logged is not None else None
        try:
            waits = [w for w in (polled, pushed) if w is not None]
            if not waits:
                raise _Attempt(Status.error(StatusCode.FAILED_PRECONDITION,
                                            f"env {slot.url} reports by /logs only, and this model endpoint has none"),
                               retry=False)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if polled is not None and polled in done:
                try:
                    return polled.result()
                except EnvError as exc:  # one rollout's bad status or a 404 says nothing of the env's health
                    if isinstance(exc, EnvUnreachableError):
                        self.pool.mark_down(slot)
                    elif isinstance(exc, (CapacityError, ServerError)):
                        self.pool.mark_down(slot, BUSY_FOR_S)
                    await self._cancel(slot, rid)
                    status, retry = _error_status(exc)
                    raise _Attempt(Status.error(StatusCode(status.code), f"while waiting: {status.message}"),
                                   retry=retry) from None
            st = self.endpoint.logged_status(rid) or Status.finished()
            return StatusResponse(terminated=True, status=st, info={})
        finally:
            self.pool.unwatch(slot, rid)
            for fut in (polled, pushed):
                if fut is not None and not fut.done():
                    fut.cancel()

    async def _cancel(self, slot: EnvSlot, rid: str) -> None:
        """Best effort, bounded: the env may be gone. One that does not even answer this (frozen,
        or gone) is taken out of rotation, so the next rollouts do not wait out their deadline there."""
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await slot.client.cancel(rid)
        except (EnvUnreachableError, TimeoutError):
            self.pool.mark_down(slot)
        except (EnvError, OSError):
            pass


def _conversation(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """The conversation as the gateway saw it: the last call's messages plus its answer."""
    if not calls:
        return []
    last = calls[-1]
    return [*last.messages, last.response]
