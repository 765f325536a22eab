"""Test helpers: real uvicorn servers on loopback ports, and a scripted OpenAI-compatible
model server that stands in for the trainer's gateway."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from env_sdk import InitRequest, RolloutMetadata


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n consecutive free loopback ports (for servers that take a base port and count up)."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free loopback ports")


@contextlib.contextmanager
def serve_app(app: Any, port: int | None = None) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a loopback port; yield its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# A reply is either text or {"tool_calls": [{"name": ..., "arguments": {...}}], "content": ...}.
Reply = str | dict[str, Any]
Script = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], Reply]


def scripted_model_app(script: Script) -> FastAPI:
    """An OpenAI-compatible `/v1/chat/completions` (any path ending in /chat/completions)
    whose answer is `script(messages, tools)`. Every request body is kept in `app.state.requests`."""
    app = FastAPI()
    app.state.requests = []

    @app.post("/{path:path}")
    async def chat(path: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        app.state.requests.append({"path": path, "body": body, "auth": request.headers.get("authorization")})
        reply = script(body["messages"], body.get("tools"))
        message: dict[str, Any] = {"role": "assistant", "content": reply if isinstance(reply, str) else reply.get("content")}
        finish = "stop"
        if isinstance(reply, dict) and reply.get("tool_calls"):
            message["tool_calls"] = [
                {
                    "id": f"call_{uuid.uuid4().hex[:8]}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))},
                }
                for c in reply["tool_calls"]
            ]
            finish = "tool_calls"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


def init_request(rid: str, sleep: float = 0.0) -> InitRequest:
    """An InitRequest for rollout `rid`; agents that honour it sleep task_metadata["sleep"] seconds."""
    md = RolloutMetadata(invocation_id="i", experiment_id="e", rollout_id=rid, run_id="u", row_id="w")
    return InitRequest(metadata=md, task_metadata={"sleep": sleep})


class Recorder:
    """ASGI wrapper counting requests by (method, path) and by path, and the distinct client sockets."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: Counter[tuple[str, str]] = Counter()
        self.paths: Counter[str] = Counter()
        self.sockets: set[tuple[str, int]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls[(scope["method"], scope["path"])] += 1
            self.paths[scope["path"]] += 1
            self.sockets.add(tuple(scope["client"]))  # type: ignore[arg-type]
        await self.app(scope, receive, send)
