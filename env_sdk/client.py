"""Async client for protocol-v1 env servers: one pooled httpx connection set, retries with backoff
on what the spec calls retryable (transport errors, 5xx, 429/503 honouring Retry-After; the
policy is `env_sdk._retry`), inits batched where the server takes it (`env_sdk._init_batch`),
and the error hierarchy of `env_sdk.errors` for the rest."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from env_sdk._init_batch import INIT_BATCH_MAX_BYTES, InitBatcher
from env_sdk._retry import MAX_RETRY_AFTER_S, Retryable, retry
from env_sdk.errors import (
    EnvError,
    EnvHTTPError,
    EnvProtocolError,
    NotFoundError,
    WaitTimeoutError,
    http_error,
)
from env_sdk.models import (
    Health,
    InitRequest,
    InitResponse,
    Status,
    StatusBatchResponse,
    StatusCode,
    StatusResponse,
    VersionResponse,
)

__all__ = [
    "BATCH_MAX_IDS",
    "INIT_BATCH_MAX_BYTES",
    "INIT_BATCH_TIMEOUT_S",
    "MAX_RETRY_AFTER_S",
    "MAX_WAIT_S",
    "POLL_EACH_CONCURRENCY",
    "EnvClient",
]

M = TypeVar("M", bound=BaseModel)

#: Longest long-poll a single request asks for (the server caps wait_s at 60).
MAX_WAIT_S = 30.0
#: Most ids in one POST /status/batch (the server's limit).
BATCH_MAX_IDS = 10_000
#: Longest wait for the answer to a POST /init/batch before its inits go one by one (servers answer
#: /init before running anything: the reference server in about a millisecond).
INIT_BATCH_TIMEOUT_S = 2.0
#: Most GET /status requests of one `poll_each` in flight at once.
POLL_EACH_CONCURRENCY = 64

_JSON = {"Content-Type": "application/json"}


def _unknown_status(rollout_id: str) -> StatusResponse:
    return StatusResponse(
        terminated=True,
        info={},
        status=Status.error(StatusCode.NOT_FOUND,
                            f"env server does not know rollout {rollout_id!r} (restarted, or result expired)"),
    )


class EnvClient:
    """Talks to one env server. Use as `async with EnvClient(url) as env: ...` or call `aclose()`.

    timeout: seconds for connect / read of one request (long-polls add their wait on top).
    max_retries: retries after the first attempt, for retryable failures only.
    max_connections: size of the connection pool; requests beyond it queue, they do not open sockets.
      Fewer is cheaper: httpx checks every pooled connection on each request (bench/protocol.py, 64 in
      flight: about 2.4 ms of client CPU per lifecycle with 8 connections, 7-11 ms with 64). With
      `wait_many` (one long-poll for all rollouts) 8-16 connections per env server are enough.
    """

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0,
                 max_retries: int = 3, max_connections: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self._timeout = httpx.Timeout(timeout, pool=None)
        self._batch_timeout = httpx.Timeout(min(timeout, INIT_BATCH_TIMEOUT_S), pool=None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        # At most max_connections requests inside httpx at a time: its pool scans every queued
        # request on each assignment, so thousands queued there cost O(n^2) CPU.
        self._slots = asyncio.Semaphore(max_connections)
        # POST /status/batch: None until the server's first answer tells; concurrent waiters
        # wait for that one quick probe, so a server without it is asked (and answers 404) once.
        self._batch_supported: bool | None = None
        self._batch_probe = asyncio.Lock()
        self._inits = InitBatcher(self)

    async def __aenter__(self) -> EnvClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._inits.aclose()
        await self._http.aclose()

    # --- transport ------------------------------------------------------------------------

    async def _send(self, method: str, path: str, params: dict[str, Any] | None, content: bytes | None,
                    timeout: httpx.Timeout, extra_headers: dict[str, str] | None = None) -> httpx.Response:
        """One attempt: the 2xx/3xx answer; Retryable for a retryable outcome; EnvHTTPError for the rest."""
        headers = _JSON if content is not None else None
        if extra_headers:
            headers = {**(headers or {}), **extra_headers}
        try:
            async with self._slots:
                resp = await self._http.request(method, path, params=params, content=content, headers=headers,
                                                timeout=timeout)
        except httpx.TransportError as exc:
            raise Retryable(exc=exc) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise Retryable(response=resp)
        if resp.status_code >= 400:
            raise http_error(resp.status_code, resp.text, method, f"{self.base_url}{path}")
        return resp

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       content: bytes | None = None, wait_s: float = 0.0,
                       headers: dict[str, str] | None = None) -> httpx.Response:
        """One request with retries (`env_sdk._retry`). The first attempt is a plain await: the
        retry machinery is set up only for a request that failed once."""
        timeout = self._timeout if wait_s == 0 else httpx.Timeout(self.timeout + wait_s, pool=None)
        try:
            return await self._send(method, path, params, content, timeout, headers)
        except Retryable as first:
            failure = first
        try:
            return await retry(lambda: self._send(method, path, params, content, timeout, headers), failure,
                               self.max_retries)
        except Retryable as last:
            raise last.final(method, f"{self.base_url}{path}", self.max_retries + 1) from last.exc

    def _parse(self, model: type[M], resp: httpx.Response) -> M:
        try:
            return model.model_validate_json(resp.content)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
            raise EnvProtocolError(
                f"{resp.request.method} {resp.request.url}: answer is not a valid {model.__name__}: {problems}"
            ) from None

    # --- endpoints ------------------------------------------------------------------------

    async def init(self, request: InitRequest) -> InitResponse:
        """Start a rollout. Safe to repeat: the server starts one rollout per rollout_id.

        Against a server that advertises `init_batch` (GET /version, asked once), the inits of
        rollouts started in the same event-loop turn (a GRPO group, the rollouts that follow a burst
        of finishes) travel together as one `POST /init/batch`; each still ends as its own `/init`
        would (started, or the same error after the same retries). Others get one `POST /init` each.

        A W3C `metadata.traceparent` also goes as the `traceparent` header of a lone `POST /init`."""
        traceparent = (request.metadata.model_extra or {}).get("traceparent")
        return await self._inits.init(request.metadata.rollout_id, request.model_dump_json(exclude_none=True).encode(),
                                      traceparent if isinstance(traceparent, str) else None)

    async def _init_one(self, rid: str, body: bytes, traceparent: str | None = None) -> InitResponse:
        resp = await self._request("POST", "/init", content=body,
                                   headers={"traceparent": traceparent} if traceparent else None)
        # Any 2xx means started: eval-protocol-era servers answer with bodies of their own (or none).
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("rollout_id") not in (None, rid):
            raise EnvProtocolError(f"POST {self.base_url}/init for rollout {rid!r} answered rollout_id "
                                   f"{answer['rollout_id']!r}")
        return InitResponse(rollout_id=rid)

    async def status(self, rollout_id: str, *, wait_s: float = 0.0) -> StatusResponse:
        """The rollout's status; with wait_s > 0 the server may hold the answer until it is terminal."""
        params: dict[str, Any] = {"rollout_id": rollout_id}
        if wait_s > 0:
            params["wait_s"] = round(wait_s, 3)
        resp = await self._request("GET", "/status", params=params, wait_s=wait_s)
        return self._parse(StatusResponse, resp)

    async def wait(self, rollout_id: str, *, deadline_s: float, poll_s: float = 0.05) -> StatusResponse:
        """Until the rollout is terminal. Uses the long-poll form of /status; against a server that
        answers at once (no long-poll), polls with backoff from poll_s up to 1 s.
        Raises WaitTimeoutError after deadline_s. Each waiting call holds one pooled connection:
        to wait on many rollouts, use `wait_many` (one request for all of them)."""
        end = time.monotonic() + deadline_s
        delay = poll_s
        while True:
            wait_s = max(0.0, min(end - time.monotonic(), MAX_WAIT_S))
            asked = time.monotonic()
            st = await self.status(rollout_id, wait_s=wait_s)
            if st.terminated:
                return st
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(f"rollout {rollout_id!r} not terminal after {deadline_s:g}s")
            if time.monotonic() - asked < wait_s / 2:  # the server did not hold the request
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    async def wait_many(self, rollout_ids: list[str], *, timeout_s: float,
                        linger_s: float = 0.02) -> dict[str, StatusResponse]:
        """The TERMINAL rollouts among rollout_ids, as soon as there is at least one (empty after
        timeout_s). Ids the server does not know come back terminal with status NOT_FOUND.
        linger_s: once one finishes, the server gathers further finishes this long, so a burst of
        finishes costs one answer, not one each.
        One long-poll `POST /status/batch` per call (per 10,000 ids); servers without that endpoint
        are polled with GET /status per id (`poll_each`; the first rollout's error is raised)."""
        ids = list(dict.fromkeys(rollout_ids))
        if not ids:
            return {}
        end = time.monotonic() + timeout_s
        delay = 0.05
        if self._batch_supported is None:
            async with self._batch_probe:
                if self._batch_supported is None:
                    found = await self._batch_any(ids, 0.0, 0.0)  # answers at once: it decides either way
                    if found:
                        return found
        while True:
            wait_s = max(0.0, min(end - time.monotonic(), MAX_WAIT_S))
            if self._batch_supported:
                found = await self._batch_any(ids, wait_s, linger_s)
            else:
                found = await self._poll_all(ids)
                if not found and time.monotonic() < end:
                    await asyncio.sleep(min(delay, max(0.0, end - time.monotonic())))
                    delay = min(delay * 2, 1.0)
            if found or time.monotonic() >= end:
                return found

    async def poll_each(self, rollout_ids: Iterable[str]) -> dict[str, StatusResponse | EnvError]:
        """One GET /status per rollout (no long-poll; at most POLL_EACH_CONCURRENCY at once), each
        with its own retries: for servers without `POST /status/batch`, or to learn which rollout's
        own status is bad when a batched answer fails. Returns, by rollout id, the terminal status,
        or the EnvError that rollout's request ended with; rollouts still running are left out.
        An id the server does not know (404) comes back terminal with status NOT_FOUND."""
        sem = asyncio.Semaphore(POLL_EACH_CONCURRENCY)

        async def one(rid: str) -> tuple[str, StatusResponse | EnvError | None]:
            async with sem:
                try:
                    st = await self.status(rid)
                except NotFoundError:
                    return rid, _unknown_status(rid)
                except EnvError as exc:
                    return rid, exc
                return rid, st if st.terminated else None

        answers = await asyncio.gather(*(one(rid) for rid in dict.fromkeys(rollout_ids)))
        return {rid: answer for rid, answer in answers if answer is not None}

    async def _poll_all(self, ids: list[str]) -> dict[str, StatusResponse]:
        """`poll_each`, raising the first rollout's error, if any."""
        found: dict[str, StatusResponse] = {}
        for rid, answer in (await self.poll_each(ids)).items():
            if isinstance(answer, EnvError):
                raise answer
            found[rid] = answer
        return found

    async def _status_batch(self, ids: list[str], wait_s: float, linger_s: float) -> dict[str, StatusResponse]:
        content = json.dumps({"rollout_ids": ids, "wait_s": round(wait_s, 3), "linger_s": linger_s}).encode()
        resp = await self._request("POST", "/status/batch", content=content, wait_s=wait_s)
        batch = self._parse(StatusBatchResponse, resp)
        self._batch_supported = True
        found = {rid: st for rid, st in batch.statuses.items() if st.terminated}
        found.update((rid, _unknown_status(rid)) for rid in batch.unknown)
        return found

    async def _batch_any(self, ids: list[str], wait_s: float, linger_s: float) -> dict[str, StatusResponse]:
        chunks = [ids[i : i + BATCH_MAX_IDS] for i in range(0, len(ids), BATCH_MAX_IDS)]
        try:
            if len(chunks) == 1:
                return await self._status_batch(chunks[0], wait_s, linger_s)
            tasks = [asyncio.create_task(self._status_batch(c, wait_s, linger_s)) for c in chunks]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            found: dict[str, StatusResponse] = {}
            for t in done:
                found.update(t.result())
            return found
        except EnvHTTPError as exc:
            if exc.status_code not in (404, 405):
                raise
            # No /status/batch here (a foreign or older server): poll per id from now on.
            self._batch_supported = False
            return await self._poll_all(ids)

    async def cancel(self, rollout_id: str) -> None:
        """Stop a rollout (its status becomes CANCELLED); a terminal one is left as it is."""
        await self._request("POST", "/cancel", params={"rollout_id": rollout_id})

    async def health(self) -> Health:
        return self._parse(Health, await self._request("GET", "/health"))

    async def version(self) -> VersionResponse:
        return self._parse(VersionResponse, await self._request("GET", "/version"))
