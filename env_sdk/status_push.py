"""Report each rollout's terminal status to a tracing gateway, the way eval-protocol servers do.

eval-protocol's own client (`RemoteRolloutProcessor`, the client of Fireworks RFT and of `ep`
remote evaluations) never reads an env server's `/status`: it polls the tracing gateway it handed
the env as `model_base_url`. Env servers written eval-protocol's way get there by logging a
`Status` record through `FireworksTracingHttpHandler`, which POSTs it to
`{FW_TRACING_GATEWAY_BASE_URL}/logs`. `StatusPusher` sends the same record for every finished
rollout, so an openrft env server finishes rollouts for that client too (SPEC §9).

Pushing never delays or fails a rollout: it runs in the background, each attempt bounded, a few
attempts, and a failure is logged once (then at debug level).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import datetime, timezone
from typing import Any

import httpx

from env_sdk.models import InitRequest, StatusCode, StatusResponse

logger = logging.getLogger("env_sdk.status_push")

#: The environment variable eval-protocol's handler reads its gateway from.
TRACING_URL_ENV = "FW_TRACING_GATEWAY_BASE_URL"
PUSH_ATTEMPTS = 3
PUSH_TIMEOUT_S = 5.0
#: How long closing the server waits for pushes still in flight.
DRAIN_S = 2.0


def resolve_tracing_url(tracing_url: str | None) -> str | None:
    """The gateway to push to: the argument, else $FW_TRACING_GATEWAY_BASE_URL, else None (off)."""
    url = tracing_url or os.environ.get(TRACING_URL_ENV) or None
    return url.rstrip("/") if url else None


def status_record(request: InitRequest, status: StatusResponse, *, logger_name: str) -> dict[str, Any]:
    """eval-protocol's status log record for a finished rollout (their handler's payload shape)."""
    meta = request.metadata
    tags = [f"rollout_id:{meta.rollout_id}", f"invocation_id:{meta.invocation_id}",
            f"experiment_id:{meta.experiment_id}", f"run_id:{meta.run_id}", f"row_id:{meta.row_id}"]
    st = status.status
    ok = st is None or st.code == StatusCode.FINISHED
    extras: dict[str, Any] = {
        "logger_name": logger_name,
        "level": "INFO" if ok else "ERROR",
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if status.reward is not None:
        extras["reward"] = status.reward
    if status.termination_reason is not None:
        extras["termination_reason"] = status.termination_reason
    return {
        "program": "eval_protocol",
        "status": st.model_dump() if st is not None else None,
        "message": "rollout finished" if ok else f"rollout failed: {st.message if st else ''}",
        "tags": tags,
        "extras": extras,
    }


class StatusPusher:
    """Posts status records to one tracing gateway in the background."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self._http = httpx.AsyncClient(timeout=PUSH_TIMEOUT_S)
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned = False
        self.sent = 0
        self.failed = 0

    def push(self, record: dict[str, Any], api_key: str | None) -> None:
        """Send `record` soon; returns at once."""
        task = asyncio.get_running_loop().create_task(self._send(record, api_key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, record: dict[str, Any], api_key: str | None) -> None:
        # eval-protocol's handler sends FIREWORKS_API_KEY; the rollout's own key proves to openrft's
        # gateway that this record speaks for this rollout only.
        key = api_key or os.environ.get("FIREWORKS_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        error = ""
        for attempt in range(PUSH_ATTEMPTS):
            try:
                resp = await self._http.post(f"{self.gateway_url}/logs", json=record, headers=headers)
                if resp.status_code == 404:
                    resp = await self._http.post(f"{self.gateway_url}/v1/logs", json=record, headers=headers)
                if resp.status_code < 500 and resp.status_code != 429:
                    if resp.status_code < 400:
                        self.sent += 1
                        return
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    break  # a refusal is not retried
                error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < PUSH_ATTEMPTS:
                await asyncio.sleep(0.2 * 2**attempt)
        self.failed += 1
        log = logger.debug if self._warned else logger.warning
        self._warned = True
        log("status push of %s to %s/logs failed (%s); later failures are logged at debug level",
            record["tags"][0], self.gateway_url, error)

    async def aclose(self) -> None:
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), DRAIN_S)
        await self._http.aclose()
