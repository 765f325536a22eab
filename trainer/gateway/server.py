"""Serving an app (the gateway) with uvicorn as a task on the running asyncio loop, so the
trainer's scheduler and the gateway share one loop and the gateway's events fire on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


class ServeError(RuntimeError):
    """The app could not be served; the message says where and why."""


@contextlib.asynccontextmanager
async def serve_gateway(app: Any, host: str, port: int, public_url: str | None) -> AsyncIterator[str]:
    """Run `app` with uvicorn as a task on the running loop; yield the URL envs reach it at."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # Ctrl-C stops the trainer, not just the gateway
            yield

    # timeout_graceful_shutdown: requests still generating at shutdown (rollouts past their
    # deadline) are cancelled after a few seconds instead of holding the exit.
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                    timeout_keep_alive=75, timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(), name="gateway")
    while not server.started:
        if task.done():
            exc = task.exception()
            raise ServeError(f"the gateway could not listen on {host}:{port}: {exc or 'uvicorn exited'}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        yield public_url.rstrip("/") if public_url else f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except (asyncio.TimeoutError, asyncio.CancelledError):  # never mask the run's own outcome
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
