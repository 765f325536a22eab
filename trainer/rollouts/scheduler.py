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
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from env_sdk import (
    AuthError,
    BadRequestError,
    CapacityError,
    EnvError,
    EnvProtocolError,
    EnvUnreachableError,
    NotFoundError,
    ServerError,
)
from env_sdk.models import InitRequest, RolloutMetadata, Status, StatusCode, StatusResponse, Task
from trainer import traces
from trainer.rollouts.endpoints import ModelEndpoint
from trainer.rollouts.pool import BUSY_FOR_S, EnvPool, EnvSlot
from trainer.rollouts.rewards import TrainerEvaluator, ScoreInvalid, score_rollout
from trainer.types import CallRecord, GroupResult, RolloutResult, status_kind

logger = logging.getLogger("trainer.rollouts")

RETRYABLE_CODES = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED, StatusCode.ABORTED, StatusCode.NOT_FOUND}
)
#: How long a POST /cancel may take before its env counts as down (it holds a step past the deadline).
CANCEL_TIMEOUT_S = 2.0
#: Final failure codes that mean the env side is broken (unreachable, 5xx, at capacity through the
#: retries, off-spec answers, forgot the rollout, refused the request or the token), not the agent
#: or its score: the circuit breaker counts these in a row.
INFRA_CODES = frozenset({
    StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED, StatusCode.DATA_LOSS, StatusCode.NOT_FOUND,
    StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED, StatusCode.INVALID_ARGUMENT,
    StatusCode.FAILED_PRECONDITION,
})


class CircuitOpen(RuntimeError):
    """Too many rollouts in a row failed for infrastructure reasons; the message says which and why."""


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


class RolloutScheduler:
    def __init__(
        self,
        pool: EnvPool,
        endpoint: ModelEndpoint,
        *,
        completion_params: dict[str, Any],
        evaluator: TrainerEvaluator | None,
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
        self.opened: str | None = None  # the circuit breaker's message once it opened

    async def run_groups(self, tasks: Sequence[tuple[int, Task]], group_size: int, step: int,
                         on_rollout: Callable[[RolloutResult], None] | None = None,
                         first_group: int = 0) -> list[GroupResult]:
        """Run `group_size` rollouts of each (dataset index, task); every rollout ends.
        `on_rollout` is called as each one ends (progress display). Groups are numbered from
        `first_group` (a step whose groups start one at a time)."""
        nonce = uuid.uuid4().hex[:6]  # a rerun of a step (after --resume) must not reuse ids

        async def one(task: Task, index: int, g: int, k: int) -> RolloutResult:
            result = await self.run_rollout(task, task_index=index, group=g, rollout_id=f"s{step}-g{g}-r{k}-{nonce}")
            self._breaker(result)
            if on_rollout is not None:
                on_rollout(result)
            return result

        jobs = [asyncio.ensure_future(one(task, index, g, k)) for g, (index, task) in enumerate(tasks, first_group)
                for k in range(group_size)]
        try:
            results = await asyncio.gather(*jobs)
        except BaseException:  # the breaker opened (or we were cancelled): stop the other rollouts
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        return [
            GroupResult(first_group + g, index, list(results[g * group_size : (g + 1) * group_size]))
            for g, (index, _) in enumerate(tasks)
        ]

    def _breaker(self, result: RolloutResult) -> None:
        """Count rollouts that failed for an infrastructure reason in a row; raise CircuitOpen at the limit."""
        if result.ok or result.status.code not in INFRA_CODES:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.max_consecutive_failures and self.consecutive_failures >= self.max_consecutive_failures:
            # it opens once: groups still ending while their step stops report the same opening
            self.opened = self.opened or (
                f"{self.consecutive_failures} rollouts in a row failed for infrastructure reasons "
                f"(rollout.max_consecutive_failures = {self.max_consecutive_failures}); the last on "
                f"{result.env_url} after {result.attempts} attempt(s): {result.failure_kind}: {result.status.message}"
            )
            raise CircuitOpen(self.opened)

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
        traceparent = traces.start_rollout(rid)  # None when tracing is off: no extra field at all
        return RolloutMetadata(invocation_id=self.run_id, experiment_id=self.experiment_id, rollout_id=rid,
                               run_id=self.run_id, row_id=str(task_index),
                               **({"traceparent": traceparent} if traceparent else {}))

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
        status = None
        try:
            status = await self._start_and_wait(request, slot)
        finally:
            slot.in_flight -= 1
            calls, mismatch = self.endpoint.close(rid)
            traces.end_rollout(rid, status.status.code if status and status.status else -1)
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
        except asyncio.CancelledError:
            # The trainer gave the rollout up (a group that could only be trained staler than
            # async.max_staleness, a step's overshoot, a stopped run): end it on the env too, or it
            # keeps holding one of the env's slots and generating until it ends by itself.
            await asyncio.shield(self._cancel(slot, rid))
            raise

    async def _wait(self, slot: EnvSlot, rid: str) -> StatusResponse:
        if slot.wait == "undecided":
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


def _conversation(calls: Sequence[CallRecord]) -> list[dict[str, Any]]:
    """The conversation as the gateway saw it: the last call's messages plus its answer."""
    if not calls:
        return []
    last = calls[-1]
    return [*last.messages, last.response]
