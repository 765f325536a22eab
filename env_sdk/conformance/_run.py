"""Running the checks against a server: the stub OpenAI-compatible model the env under test
calls, served on loopback, and `run_conformance`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from env_sdk.conformance._checks import CheckResult, Conformance


def stub_model_app() -> FastAPI:
    """An OpenAI-compatible chat endpoint at any path ending in /chat/completions that always answers
    with text. It counts calls per rollout id found in the path (the gateway's URL shape)."""
    app = FastAPI()
    app.state.calls = Counter()

    @app.post("/{path:path}")
    async def chat(path: str, request: Request) -> dict[str, Any]:
        m = re.search(r"rollout_id/([^/]+)/", path)
        app.state.calls[m.group(1) if m else ""] += 1
        body = await request.json()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello from the conformance stub."}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


@contextlib.asynccontextmanager
async def serve_stub(host: str) -> AsyncIterator[tuple[str, FastAPI]]:
    app = stub_model_app()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("stub model server did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}", app
    finally:
        server.should_exit = True
        await task


async def run_conformance(url: str, *, token: str | None = None, model_url: str | None = None,
                          task: dict[str, Any] | None = None, deadline_s: float = 30.0, strict: bool = False,
                          stub_host: str = "127.0.0.1") -> list[CheckResult]:
    """Run every check against the env server at `url`; it conforms when no result `fails` (with
    `strict`, as against a server that claims v1, an absent extension fails too)."""
    if model_url:
        conf = Conformance(url.rstrip("/"), token, model_url, task or {}, strict=strict, deadline_s=deadline_s)
        return await conf.run()
    async with serve_stub(stub_host) as (stub_url, stub):
        conf = Conformance(url.rstrip("/"), token, f"{stub_url}/v1", task or {}, strict=strict,
                           deadline_s=deadline_s, model_calls=stub.state.calls)
        return await conf.run()
