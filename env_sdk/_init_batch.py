"""EnvClient's init batching: the inits issued in one event-loop turn (a GRPO group, the rollouts
that follow a burst of finishes) travel as one `POST /init/batch` to a server that advertises
the `init_batch` capability (GET /version, asked once), each item ending exactly as its own
`POST /init` would (started, or the same error after the same retries)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from env_sdk._retry import Retryable, backoff_s
from env_sdk.errors import EnvError, EnvHTTPError, EnvProtocolError, http_error
from env_sdk.models import (
    CAP_INIT_BATCH,
    INIT_BATCH_MAX,
    ErrorResponse,
    InitBatchItem,
    InitBatchResponse,
    InitResponse,
    VersionResponse,
)

if TYPE_CHECKING:
    from env_sdk.client import EnvClient

#: Most bytes in one POST /init/batch from this client (the reference server caps bodies at 4 MiB).
INIT_BATCH_MAX_BYTES = 1024 * 1024


@dataclass
class _PendingInit:
    """An init waiting for its place in a POST /init/batch."""

    rollout_id: str
    body: bytes  # the InitRequest as JSON
    future: asyncio.Future[InitResponse]
    attempt: int = 1


class InitBatcher:
    """Starts rollouts for one EnvClient: batched where the server takes it, else one by one."""

    def __init__(self, client: EnvClient) -> None:
        self.client = client
        self.supported: bool | None = None  # POST /init/batch: None until GET /version says
        self._probing: asyncio.Future[None] | None = None
        self._queue: list[_PendingInit] = []
        self._tasks: set[asyncio.Future[None]] = set()

    async def aclose(self) -> None:
        tasks = [*self._tasks, *([self._probing] if self._probing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def init(self, rid: str, body: bytes, traceparent: str | None = None) -> InitResponse:
        if self.supported is None:
            await self._ask_capabilities()
        if not self.supported or len(body) > INIT_BATCH_MAX_BYTES:
            return await self.client._init_one(rid, body, traceparent)
        item = _PendingInit(rid, body, asyncio.get_running_loop().create_future())
        self._enqueue(item)
        return await item.future

    async def _ask_capabilities(self) -> None:
        """Learn from GET /version whether the server takes `POST /init/batch`: one request, shared
        by the callers that arrive meanwhile, one attempt. A server that does not answer leaves it
        unknown (this init goes alone; a later one asks again); any other answer settles it."""
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._probe())
        await asyncio.shield(self._probing)

    async def _probe(self) -> None:
        try:
            resp = await self.client._send("GET", "/version", None, None, self.client._timeout)
            capabilities = VersionResponse.model_validate_json(resp.content).capabilities
        except Retryable:
            self._probing = None
            return
        except (EnvError, ValueError):  # no /version (eval-protocol servers), or one of its own
            capabilities = []
        self.supported = CAP_INIT_BATCH in capabilities

    def _enqueue(self, item: _PendingInit) -> None:
        if item.future.done():  # its caller stopped waiting
            return
        self._queue.append(item)
        if len(self._queue) == 1:  # sent once the callers already scheduled in this turn have queued theirs
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        chunk: list[_PendingInit] = []
        size = 0
        for item in queue:
            if chunk and (len(chunk) == INIT_BATCH_MAX or size + len(item.body) > INIT_BATCH_MAX_BYTES):
                self._spawn(self._send_batch(chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += len(item.body) + 1
        if chunk:
            self._spawn(self._send_batch(chunk))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, chunk: list[_PendingInit]) -> None:
        """One POST /init/batch for `chunk`, then each item's outcome onto its future."""
        client = self.client
        content = b'{"requests":[' + b",".join(item.body for item in chunk) + b"]}"
        try:
            # One attempt only. No answer in time, a transport error, a 5xx or 429 for the whole
            # batch: each init goes alone, with /init's own retries (idempotent, so an item the
            # server did start answers 200), so one item that hangs the server's /init/batch
            # delays the others by INIT_BATCH_TIMEOUT_S at most. 404/405: not served after all.
            try:
                resp = await client._send("POST", "/init/batch", None, content, client._batch_timeout)
            except Retryable:
                resp = None
            except EnvHTTPError as exc:
                if exc.status_code not in (404, 405, 413):
                    raise
                if exc.status_code != 413:
                    self.supported = False
                resp = None
            if resp is None:
                await asyncio.gather(*(self._init_alone(item) for item in chunk))
                return
            results = client._parse(InitBatchResponse, resp).results
            if len(results) != len(chunk):
                raise EnvProtocolError(f"POST {client.base_url}/init/batch: {len(results)} results for "
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
        base_url = self.client.base_url
        if 200 <= code < 300:
            if result.rollout_id not in (None, item.rollout_id):
                item.future.set_exception(EnvProtocolError(
                    f"POST {base_url}/init/batch for rollout {item.rollout_id!r} answered rollout_id "
                    f"{result.rollout_id!r}"))
            else:
                item.future.set_result(InitResponse(rollout_id=item.rollout_id))
            return
        retryable = code == 429 or code >= 500
        if retryable and item.attempt <= self.client.max_retries:
            self._spawn(self._requeue(item, backoff_s(result.retry_after, item.attempt)))
            return
        error = ErrorResponse(detail=result.detail or f"HTTP {code}", errors=result.errors)
        item.future.set_exception(http_error(code, error.model_dump_json(exclude_none=True), "POST",
                                             f"{base_url}/init"))

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
            response = await self.client._init_one(item.rollout_id, item.body)
        except Exception as exc:  # noqa: BLE001 - handed to the caller waiting on the future
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(response)
