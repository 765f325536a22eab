"""The env servers of a run: a health probe at start, routing each attempt to an env that is up,
and waiting for terminal statuses in batched long-poll waves (one request per env per wave, not
one per rollout per interval), or learning that an env reports by the gateway's /logs instead."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from env_sdk import (
    EnvClient,
    EnvError,
    EnvHTTPError,
    EnvProtocolError,
    EnvUnreachableError,
    NotFoundError,
    ServerError,
)
from env_sdk.models import StatusResponse
from trainer.config import EnvEndpoint

logger = logging.getLogger("trainer.rollouts")

#: How long an env that refused connections is skipped by the router.
DOWN_FOR_S = 10.0
#: How long an env that stayed at capacity (429/503) or failed (5xx) is skipped.
BUSY_FOR_S = 2.0
#: How often a down env's /health is tried while every env is down.
REVIVE_POLL_S = 0.5
#: Debounce before a waiter sends a long-poll, so a burst of new rollouts shares one request.
POLL_DEBOUNCE_S = 0.005


class EnvsUnreachable(RuntimeError):
    """No configured env server answers /health; the message names each URL and its error."""


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
    #: "auto" until probed; then "poll", "logs", or "undecided" (no openrft /health: `settle_wait` decides)
    wait: str = "auto"
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
        (eval-protocol servers): with wait "auto" it is "undecided" until its first rollout's first
        /status answer decides (`settle_wait`). An env never probed is polled and heard by /logs."""

        async def one(slot: EnvSlot) -> str | None:
            try:
                async with EnvClient(slot.url, token=slot.token, timeout=timeout_s, max_retries=1) as probe:
                    await probe.health()
            except (NotFoundError, EnvProtocolError) as exc:
                if slot.wait == "auto":
                    slot.wait = "undecided"
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
        """For an "undecided" env: one GET /status of a rollout it just accepted.
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
        if slot.wait == "undecided":
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
        """GET /status per rollout (`EnvClient.poll_each`); a rollout whose own answer fails gets the error."""
        found: dict[str, StatusResponse] = {}
        for rid, answer in (await slot.client.poll_each(ids)).items():
            if isinstance(answer, StatusResponse):
                found[rid] = answer
                continue
            fut = slot.waiter.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(answer)
        return found

    async def aclose(self) -> None:
        for slot in self.slots:
            w = slot.waiter
            tasks = [t for t in [w.task, *w.polls, slot.reviving] if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await slot.client.aclose()
