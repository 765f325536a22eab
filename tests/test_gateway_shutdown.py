"""The trainer's gateway shuts down promptly and quietly while a request is still being
answered (a rollout generating past its deadline): the run's own outcome is never masked."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI

from trainer.gateway.server import serve_gateway


async def test_shutdown_with_a_request_in_flight() -> None:
    app = FastAPI()

    @app.post("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(120)
        return {"late": "yes"}

    async with httpx.AsyncClient(timeout=60) as client:
        async with serve_gateway(app, "127.0.0.1", 0, None) as url:
            pending = asyncio.create_task(client.post(f"{url}/slow"))
            await asyncio.sleep(0.3)  # the request is in the handler now
            started = time.monotonic()
        took = time.monotonic() - started
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    assert took < 15, f"gateway shutdown took {took:.1f}s with a request in flight"
