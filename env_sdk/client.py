"""Async client for protocol-v1 env servers: one pooled httpx connection set, retries with backoff
on what the spec calls retryable (transport errors, 5xx, 429/503 honouring Retry-After), and the
error hierarchy of `env_sdk.errors` for the rest."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from env_sdk.errors import (
    EnvError,
    EnvHTTPError,
    EnvProtocolError,
    EnvUnreachableError,
    NotFoundError,
    WaitTimeoutError,
    http_error,
)
from env_sdk.models import (
    CAP_INIT_BATCH,
    INIT_BATCH_MAX,
    ErrorResponse,
    Health,
    InitBatchItem,
    InitBatchResponse,
    InitRequest,
    InitResponse,
    Status,
    StatusBatchResponse,
    StatusCode,
    StatusResponse,
    VersionResponse,
)

M = TypeVar("M", bound=BaseModel)

#: Longest long-poll a single request asks for (the server caps wait_s at 60).
MAX_WAIT_S = 30.0
#: Most ids in one POST /status/batch (the server's limit).
BATCH_MAX_IDS = 10_000
#: Most bytes in one POST /init/batch from this client (the reference server caps bodies at 4 MiB).
INIT_BATCH_MAX_BYTES = 1024 * 1024
#: Longest wait for the answer to a POST /init/batch before its inits go one by one (servers answer
#: /init before running anything: the reference server in about a millisecond).
INIT_BATCH_TIMEOUT_S = 2.0
#: Longest Retry-After honoured; a server asking for more gets this.
MAX_RETRY_AFTER_S = 30.0

_JSON = {"Content-Type": "application/json"}


class _Retry(Exception):
    """A retryable outcome: an error response or a transport exception."""

    def __init__(self, response: httpx.Response | None = None, exc: httpx.TransportError | None = None) -> None:
        self.response = response
        self.exc = exc
        self.retry_after: float | None = None
        if response is not None:
            try:
                self.retry_after = max(0.0, float(response.headers.get("retry-after", "")))
            except ValueError:  # absent, or an HTTP date: fall back to backoff
                self.retry_after = None


@dataclass
class _PendingInit:
    """An init waiting for its place in a POST /init/batch."""

    rollout_id: str
    body: bytes  # the InitRequest as JSON
    future: asyncio.Future[InitResponse]
    attempt: int = 1


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
        self._batch_supported = True  # POST /status/batch, until a 404/405 says otherwise
        self._init_batch_ok: bool | None = None  # POST /init/batch: None until GET /version says
        self._probing: asyncio.Future[None] | None = None
        self._init_queue: list[_PendingInit] = []
        self._init_tasks: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> EnvClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks = [*self._init_tasks, *([self._probing] if self._probing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    # --- transport ------------------------------------------------------------------------

    def _delay(self, retry_after: float | None, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): Retry-After, else backoff."""
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return min(0.1 * 2 ** (attempt - 1), 5.0) * random.uniform(0.5, 1.5)

    async def _send(self, method: str, path: str, params: dict[str, Any] | None, content: bytes | None,
                    timeout: httpx.Timeout) -> httpx.Response:
        """One attempt: the 2xx/3xx answer; _Retry for a retryable outcome; EnvHTTPError for the rest."""
        headers = _JSON if content is not None else None
        try:
            async with self._slots:
                resp = await self._http.request(method, path, params=params, content=content, headers=headers,
                                                timeout=timeout)
        except httpx.TransportError as exc:
            raise _Retry(exc=exc) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Retry(response=resp)
        if resp.status_code >= 400:
            raise http_error(resp.status_code, resp.text, method, f"{self.base_url}{path}")
        return resp

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       content: bytes | None = None, wait_s: float = 0.0) -> httpx.Response:
        """One request with retries. Every v1 endpoint is idempotent, so every retry is safe.
        A plain loop: the backoff and Retry-After are `_delay`'s, and a retry library's per-request
        set-up (~60 us with tenacity) would be paid on every request, failing or not."""
        timeout = self._timeout if wait_s == 0 else httpx.Timeout(self.timeout + wait_s, pool=None)
        attempt = 1
        while True:
            try:
                return await self._send(method, path, params, content, timeout)
            except _Retry as exc:
                failure = exc
            if attempt > self.max_retries:
                break
            await asyncio.sleep(self._delay(failure.retry_after, attempt))
            attempt += 1
        if failure.response is not None:
            r = failure.response
            raise http_error(r.status_code, r.text, method, f"{self.base_url}{path}") from None
        attempts = self.max_retries + 1
        raise EnvUnreachableError(
            f"{method} {self.base_url}{path}: {type(failure.exc).__name__}: {failure.exc} "
            f"(after {attempts} attempt{'s' * (attempts > 1)})"
        ) from failure.exc

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
        would (started, or the same error after the same retries). Others get one `POST /init` each."""
        rid = request.metadata.rollout_id
        body = request.model_dump_json(exclude_none=True).encode()
        if self._init_batch_ok is None:
            await self._ask_capabilities()
        if not self._init_batch_ok or len(body) > INIT_BATCH_MAX_BYTES:
            return await self._init_one(rid, body)
        item = _PendingInit(rid, body, asyncio.get_running_loop().create_future())
        self._enqueue(item)
        return await item.future

    async def _init_one(self, rid: str, body: bytes) -> InitResponse:
        resp = await self._request("POST", "/init", content=body)
        # Any 2xx means started: eval-protocol-era servers answer with bodies of their own (or none).
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("rollout_id") not in (None, rid):
            raise EnvProtocolError(f"POST {self.base_url}/init for rollout {rid!r} answered rollout_id "
                                   f"{answer['rollout_id']!r}")
        return InitResponse(rollout_id=rid)

    async def _ask_capabilities(self) -> None:
        """Learn from GET /version whether the server takes `POST /init/batch`: one request, shared
        by the callers that arrive meanwhile, one attempt. A server that does not answer leaves it
        unknown (this init goes alone; a later one asks again); any other answer settles it."""
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._probe())
        await asyncio.shield(self._probing)

    async def _probe(self) -> None:
        try:
            resp = await self._send("GET", "/version", None, None, self._timeout)
            capabilities = VersionResponse.model_validate_json(resp.content).capabilities
        except _Retry:
            self._probing = None
            return
        except (EnvError, ValueError):  # no /version (eval-protocol servers), or one of its own
            capabilities = []
        self._init_batch_ok = CAP_INIT_BATCH in capabilities

    def _enqueue(self, item: _PendingInit) -> None:
        if item.future.done():  # its caller stopped waiting
            return
        self._init_queue.append(item)
        if len(self._init_queue) == 1:  # sent once the callers already scheduled in this turn have queued theirs
            asyncio.get_running_loop().call_soon(self._flush_inits)

    def _flush_inits(self) -> None:
        queue, self._init_queue = self._init_queue, []
        chunk: list[_PendingInit] = []
        size = 0
        for item in queue:
            if chunk and (len(chunk) == INIT_BATCH_MAX or size + len(item.body) > INIT_BATCH_MAX_BYTES):
                self._spawn(self._send_inits(chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += len(item.body) + 1
        if chunk:
            self._spawn(self._send_inits(chunk))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._init_tasks.add(task)
        task.add_done_callback(self._init_tasks.discard)

    async def _send_inits(self, chunk: list[_PendingInit]) -> None:
        """One POST /init/batch for `chunk`, then each item's outcome onto its future."""
        content = b'{"requests":[' + b",".join(item.body for item in chunk) + b"]}"
        try:
            # One attempt only. No answer in time, a transport error, a 5xx or 429 for the whole
            # batch: each init goes alone, with /init's own retries (idempotent, so an item the
            # server did start answers 200), so one item that hangs the server's /init/batch
            # delays the others by INIT_BATCH_TIMEOUT_S at most. 404/405: not served after all.
            try:
                resp = await self._send("POST", "/init/batch", None, content, self._batch_timeout)
            except _Retry:
                resp = None
            except EnvHTTPError as exc:
                if exc.status_code not in (404, 405, 413):
                    raise
                if exc.status_code != 413:
                    self._init_batch_ok = False
                resp = None
            if resp is None:
                await asyncio.gather(*(self._init_alone(item) for item in chunk))
                return
            results = self._parse(InitBatchResponse, resp).results
            if len(results) != len(chunk):
                raise EnvProtocolError(f"POST {self.base_url}/init/batch: {len(results)} results for "
                                       f"{len(chunk)} requests")
        except asyncio.CancelledError:
            for item in chunk:
                item.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - what fails the batch fails each init, as it would alone
            for item in chunk:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, result in zip(chunk, results):
            self._settle(item, result)

    def _settle(self, item: _PendingInit, result: InitBatchItem) -> None:
        if item.future.done():
            return
        code = result.status_code
        if 200 <= code < 300:
            if result.rollout_id not in (None, item.rollout_id):
                item.future.set_exception(EnvProtocolError(
                    f"POST {self.base_url}/init/batch for rollout {item.rollout_id!r} answered rollout_id "
                    f"{result.rollout_id!r}"))
            else:
                item.future.set_result(InitResponse(rollout_id=item.rollout_id))
            return
        retryable = code == 429 or code >= 500
        if retryable and item.attempt <= self.max_retries:
            self._spawn(self._requeue(item, self._delay(result.retry_after, item.attempt)))
            return
        error = ErrorResponse(detail=result.detail or f"HTTP {code}", errors=result.errors)
        item.future.set_exception(http_error(code, error.model_dump_json(exclude_none=True), "POST",
                                             f"{self.base_url}/init"))

    async def _requeue(self, item: _PendingInit, delay: float) -> None:
        """The next attempt of an init the server refused for now (429 / 503), after the wait."""
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            item.future.cancel()
            raise
        item.attempt += 1
        self._enqueue(item)

    async def _init_alone(self, item: _PendingInit) -> None:
        try:
            response = await self._init_one(item.rollout_id, item.body)
        except Exception as exc:  # noqa: BLE001 - handed to the caller waiting on the future
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(response)

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
        are polled with GET /status per id."""
        ids = list(dict.fromkeys(rollout_ids))
        if not ids:
            return {}
        end = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            wait_s = max(0.0, min(end - time.monotonic(), MAX_WAIT_S))
            if self._batch_supported:
                found = await self._batch_any(ids, wait_s, linger_s)
            else:
                found = await self._poll_each(ids)
                if not found and time.monotonic() < end:
                    await asyncio.sleep(min(delay, max(0.0, end - time.monotonic())))
                    delay = min(delay * 2, 1.0)
            if found or time.monotonic() >= end:
                return found

    async def _status_batch(self, ids: list[str], wait_s: float, linger_s: float) -> dict[str, StatusResponse]:
        content = json.dumps({"rollout_ids": ids, "wait_s": round(wait_s, 3), "linger_s": linger_s}).encode()
        resp = await self._request("POST", "/status/batch", content=content, wait_s=wait_s)
        batch = self._parse(StatusBatchResponse, resp)
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
            return await self._poll_each(ids)

    async def _poll_each(self, ids: list[str]) -> dict[str, StatusResponse]:
        sem = asyncio.Semaphore(64)

        async def one(rid: str) -> tuple[str, StatusResponse | None]:
            async with sem:
                try:
                    st = await self.status(rid)
                except NotFoundError:
                    return rid, _unknown_status(rid)
                return rid, st if st.terminated else None

        results = await asyncio.gather(*(one(rid) for rid in ids))
        return {rid: st for rid, st in results if st is not None}

    async def cancel(self, rollout_id: str) -> None:
        """Stop a rollout (its status becomes CANCELLED); a terminal one is left as it is."""
        await self._request("POST", "/cancel", params={"rollout_id": rollout_id})

    async def health(self) -> Health:
        return self._parse(Health, await self._request("GET", "/health"))

    async def version(self) -> VersionResponse:
        return self._parse(VersionResponse, await self._request("GET", "/version"))
