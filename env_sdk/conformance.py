"""`openrft conformance URL [--token T]`: check any env server against protocol v1.

It talks raw HTTP (no retries, so nothing is masked), starts rollouts whose `model_base_url`
points at a stub OpenAI-compatible model it serves itself on loopback (or `--model-url`), and
prints one row per check. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from env_sdk.models import (
    CAP_INIT_BATCH,
    PROTOCOL_VERSION,
    Health,
    InitBatchResponse,
    StatusBatchResponse,
    StatusResponse,
    VersionResponse,
)

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class CheckResult:
    name: str
    outcome: str  # PASS / FAIL / SKIP
    detail: str = ""


class CheckFailed(Exception):
    pass


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def _shape(model: type[Any], resp: httpx.Response) -> Any:
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CheckFailed(f"body is not a {model.__name__}: {'.'.join(map(str, first['loc'])) or 'body'}: "
                          f"{first['msg']} (got {resp.text[:120]!r})") from None


def _has_message(resp: httpx.Response) -> bool:
    """A 4xx body that tells the caller something: JSON `detail`/`message`/`error`, or plain text."""
    try:
        body = resp.json()
    except ValueError:
        return bool(resp.text.strip())
    if isinstance(body, dict):
        return any(body.get(k) for k in ("detail", "message", "error"))
    return bool(body)


# --- the stub model the env under test calls --------------------------------------------------


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


# --- the checks -------------------------------------------------------------------------------


@dataclass
class Conformance:
    url: str
    token: str | None
    model_url: str
    task: dict[str, Any]
    deadline_s: float = 30.0
    init_fast_s: float = 1.0
    model_calls: Counter[str] | None = None
    results: list[CheckResult] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def body(self, rid: str) -> dict[str, Any]:
        ids = {"invocation_id": "conformance", "experiment_id": "conformance", "rollout_id": rid,
               "run_id": self.run_id, "row_id": "0"}
        gateway = self.model_url.rstrip("/") + "/" + "/".join(f"{k}/{v}" for k, v in [
            ("rollout_id", rid), ("invocation_id", "conformance"), ("experiment_id", "conformance"),
            ("run_id", self.run_id), ("row_id", "0")])
        return {"completion_params": {"model": "policy", "temperature": 1.0, "max_tokens": 32},
                "messages": [{"role": "user", "content": "Say hello."}], "model_base_url": gateway,
                "api_key": f"conformance-{rid}", "metadata": ids, **self.task}

    def rid(self, label: str) -> str:
        return f"conf-{self.run_id}-{label}"

    async def check(self, name: str, fn: Callable[[], Awaitable[str | None]]) -> bool:
        try:
            detail = await fn()
        except CheckFailed as exc:
            self.results.append(CheckResult(name, FAIL, str(exc)))
            return False
        except httpx.HTTPError as exc:
            self.results.append(CheckResult(name, FAIL, f"{type(exc).__name__}: {exc}"))
            return False
        if detail is not None and detail.startswith("skip:"):
            self.results.append(CheckResult(name, SKIP, detail[5:].strip()))
            return True
        self.results.append(CheckResult(name, PASS, detail or ""))
        return True

    async def wait_terminal(self, http: httpx.AsyncClient, rid: str, within_s: float) -> StatusResponse:
        end = time.monotonic() + within_s
        while True:
            resp = await http.get("/status", params={"rollout_id": rid, "wait_s": 1.0}, timeout=within_s + 5)
            _expect(resp.status_code == 200, f"GET /status for a started rollout: HTTP {resp.status_code}")
            st: StatusResponse = _shape(StatusResponse, resp)
            if st.terminated:
                return st
            if time.monotonic() > end:
                raise CheckFailed(f"rollout {rid} not terminal after {within_s:g}s")
            await asyncio.sleep(0.05)

    async def run(self) -> list[CheckResult]:
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers(), timeout=30) as http:
            await self._run(http)
        return self.results

    async def _run(self, http: httpx.AsyncClient) -> None:
        main_rid, dup_rid = self.rid("main"), self.rid("dup")

        async def health() -> str:
            resp = await http.get("/health")
            _expect(resp.status_code == 200, f"GET /health: HTTP {resp.status_code}")
            h: Health = _shape(Health, resp)
            _expect(h.capacity >= 1, f"capacity {h.capacity} < 1")
            return f"capacity {h.capacity}, in flight {h.in_flight}"

        async def version() -> str:
            resp = await http.get("/version")
            _expect(resp.status_code == 200, f"GET /version: HTTP {resp.status_code}")
            v: VersionResponse = _shape(VersionResponse, resp)
            _expect(v.protocol_version == PROTOCOL_VERSION, f"protocol_version {v.protocol_version!r}, expected "
                                                            f"{PROTOCOL_VERSION!r}")
            header = resp.headers.get("x-openrft-protocol")
            _expect(header == PROTOCOL_VERSION, f"X-OpenRFT-Protocol header is {header!r}")
            return f"v{v.protocol_version} ({v.sdk or v.name})"

        async def auth() -> str:
            if not self.token:
                return "skip: no --token given"
            for label, headers in [("no token", {}), ("wrong token", {"Authorization": "Bearer not-the-token"})]:
                probes: list[tuple[str, str, dict[str, Any]]] = [
                    ("POST", "/init", {"json": self.body(self.rid("auth"))}),
                    ("GET", "/status", {"params": {"rollout_id": main_rid}}),
                ]
                for method, path, kw in probes:
                    async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30) as anon:
                        resp = await anon.request(method, path, **kw)
                    _expect(resp.status_code == 401, f"{method} {path} with {label}: HTTP {resp.status_code}, "
                                                     "expected 401")
            return "401 without / with a wrong token"

        async def init_fast() -> str:
            t0 = time.monotonic()
            resp = await http.post("/init", json=self.body(main_rid))
            took = time.monotonic() - t0
            _expect(resp.status_code in (200, 202), f"POST /init: HTTP {resp.status_code}: {resp.text[:200]}")
            _expect(took <= self.init_fast_s, f"POST /init took {took:.2f}s (> {self.init_fast_s:g}s): it must "
                                              "return before the rollout runs")
            with contextlib.suppress(ValueError):
                rid = resp.json().get("rollout_id")
                _expect(rid in (None, main_rid), f"answered rollout_id {rid!r}, sent {main_rid!r}")
            return f"HTTP {resp.status_code} in {took * 1000:.0f} ms"

        async def status_shape() -> str:
            resp = await http.get("/status", params={"rollout_id": main_rid})
            _expect(resp.status_code == 200, f"GET /status: HTTP {resp.status_code}")
            st: StatusResponse = _shape(StatusResponse, resp)
            _expect(st.status is not None, "status object missing")
            return f"terminated={st.terminated}, code {st.status.code if st.status else '-'}"

        async def terminal() -> str:
            st = await self.wait_terminal(http, main_rid, self.deadline_s)
            _expect(st.status is not None, "terminal status without a status object")
            if st.status is not None and not st.status.ok:
                raise CheckFailed(f"the rollout failed: code {st.status.code} {st.status.message!r} (does the env "
                                  "need a real task? pass one with --task FILE)")
            if st.reward is not None:
                _expect(0.0 <= st.reward <= 1.0, f"reward {st.reward} outside [0, 1]")
            calls = (self.model_calls or Counter()).get(main_rid, 0)
            return (f"code {st.status.code if st.status else '-'} {st.status.message if st.status else ''!r}, "
                    f"reward {st.reward}, {calls} model call(s)")

        async def idempotent() -> str:
            first = await http.post("/init", json=self.body(dup_rid))
            second = await http.post("/init", json=self.body(dup_rid))
            _expect(first.status_code in (200, 202), f"first POST /init: HTTP {first.status_code}")
            _expect(second.status_code in (200, 202), f"repeated POST /init with the same rollout_id: "
                                                      f"HTTP {second.status_code}, expected 200 or 202")
            await self.wait_terminal(http, dup_rid, self.deadline_s)
            if self.model_calls is not None and self.model_calls.get(main_rid):
                once, twice = self.model_calls[main_rid], self.model_calls[dup_rid]
                _expect(twice == once, f"the repeated rollout made {twice} model calls, a single one {once}: "
                                       "it ran twice")
            return f"HTTP {first.status_code} then {second.status_code}, one rollout"

        async def unknown_id() -> str:
            resp = await http.get("/status", params={"rollout_id": self.rid("never-started")})
            _expect(resp.status_code == 404, f"GET /status for an unknown id: HTTP {resp.status_code}, expected 404")
            return "404"

        async def bad_body() -> str:
            seen = []
            cases: list[tuple[str, dict[str, Any]]] = [
                ("malformed JSON", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
                ("missing metadata", {"json": {"messages": []}}),
                ("wrong type", {"json": {**self.body(self.rid("bad")), "messages": "hello"}}),
            ]
            for label, kw in cases:
                resp = await http.post("/init", **kw)
                _expect(400 <= resp.status_code < 500, f"{label}: HTTP {resp.status_code}, expected 4xx")
                _expect(resp.status_code not in (401, 403, 404, 429), f"{label}: HTTP {resp.status_code}")
                _expect(_has_message(resp), f"{label}: HTTP {resp.status_code} without a message")
                seen.append(str(resp.status_code))
            resp = await http.get("/status")
            _expect(400 <= resp.status_code < 500, f"GET /status without rollout_id: HTTP {resp.status_code}")
            return "/".join(seen) + " with messages"

        async def cancel() -> str:
            rid = self.rid("cancel")
            resp = await http.post("/init", json=self.body(rid))
            _expect(resp.status_code in (200, 202), f"POST /init: HTTP {resp.status_code}")
            resp = await http.post("/cancel", params={"rollout_id": rid})
            _expect(resp.status_code == 200, f"POST /cancel: HTTP {resp.status_code}, expected 200")
            st = await self.wait_terminal(http, rid, 10.0)
            missing = await http.post("/cancel", params={"rollout_id": self.rid("never-started")})
            _expect(missing.status_code == 404, f"POST /cancel for an unknown id: HTTP {missing.status_code}")
            return f"terminal with code {st.status.code if st.status else '-'}"

        async def batch() -> str:
            ghost = self.rid("ghost")
            resp = await http.post("/status/batch", json={"rollout_ids": [main_rid, ghost], "wait_s": 1.0})
            _expect(resp.status_code == 200, f"POST /status/batch: HTTP {resp.status_code}")
            b: StatusBatchResponse = _shape(StatusBatchResponse, resp)
            _expect(main_rid in b.statuses, "a terminal rollout is missing from `statuses`")
            _expect(b.unknown == [ghost], f"unknown = {b.unknown}, expected [{ghost!r}]")
            return "terminal listed, unknown id reported"

        async def init_batch() -> str:
            resp = await http.get("/version")
            capabilities: list[str] = []
            if resp.status_code == 200:
                with contextlib.suppress(ValueError):
                    capabilities = VersionResponse.model_validate_json(resp.content).capabilities
            if CAP_INIT_BATCH not in capabilities:
                return "skip: optional, not advertised in GET /version capabilities"
            rid = self.rid("batch")
            items = [self.body(rid), self.body(rid), {"messages": "hello"}]
            resp = await http.post("/init/batch", json={"requests": items})
            _expect(resp.status_code == 200, f"POST /init/batch: HTTP {resp.status_code}: {resp.text[:200]}")
            b: InitBatchResponse = _shape(InitBatchResponse, resp)
            codes = [r.status_code for r in b.results]
            _expect(len(codes) == 3, f"{len(codes)} results for 3 requests")
            _expect(codes[0] in (200, 202) and codes[1] == 200, f"a new rollout then its repeat: HTTP {codes[:2]}, "
                                                                "expected 202 (or 200) then 200")
            _expect(400 <= codes[2] < 500 and bool(b.results[2].detail), f"an invalid item: HTTP {codes[2]}, "
                                                                         f"detail {b.results[2].detail!r}")
            await self.wait_terminal(http, rid, self.deadline_s)
            return f"per item: {'/'.join(map(str, codes))}"

        for name, fn in [
            ("health (capacity)", health),
            ("version discovery", version),
            ("bearer token -> 401", auth),
            ("init accepted fast", init_fast),
            ("status shape", status_shape),
            ("terminal state reached", terminal),
            ("idempotent init", idempotent),
            ("unknown id -> 404", unknown_id),
            ("bad body -> 4xx + message", bad_body),
            ("cancel", cancel),
            ("batched status", batch),
            ("batched init (optional)", init_batch),
        ]:
            await self.check(name, fn)


async def run_conformance(url: str, *, token: str | None = None, model_url: str | None = None,
                          task: dict[str, Any] | None = None, deadline_s: float = 30.0,
                          stub_host: str = "127.0.0.1") -> list[CheckResult]:
    """Run every check against the env server at `url`."""
    if model_url:
        conf = Conformance(url.rstrip("/"), token, model_url, task or {}, deadline_s=deadline_s)
        return await conf.run()
    async with serve_stub(stub_host) as (stub_url, stub):
        conf = Conformance(url.rstrip("/"), token, f"{stub_url}/v1", task or {}, deadline_s=deadline_s,
                           model_calls=stub.state.calls)
        return await conf.run()


def print_table(url: str, results: list[CheckResult], console: Console | None = None) -> None:
    table = Table(title=f"protocol v{PROTOCOL_VERSION} conformance: {url}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    style = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    for r in results:
        table.add_row(r.name, f"[{style[r.outcome]}]{r.outcome}[/]", r.detail)
    (console or Console()).print(table)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="base URL of the env server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", help="the server's bearer token (also checks that a wrong one gets 401)")
    parser.add_argument("--model-url", help="OpenAI-compatible base URL the env should call (default: a stub "
                                            "served by this command on loopback)")
    parser.add_argument("--stub-host", default="127.0.0.1", help="address the stub model listens on")
    parser.add_argument("--task", help="JSON file with InitRequest fields to send (messages, tools, "
                                       "task_metadata, completion_params) when the env needs a real task")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds a rollout may take (default 30)")
    args = parser.parse_args(argv)
    task: dict[str, Any] = {}
    if args.task:
        try:
            with open(args.task) as f:
                task = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"--task {args.task}: {exc}")
        if not isinstance(task, dict):
            parser.error(f"--task {args.task}: must hold a JSON object, got {type(task).__name__}")
    results = asyncio.run(run_conformance(args.url, token=args.token, model_url=args.model_url, task=task,
                                          deadline_s=args.deadline, stub_host=args.stub_host))
    print_table(args.url, results)
    failed = [r.name for r in results if r.outcome == FAIL]
    if failed:
        Console(stderr=True).print(f"[bold red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        return 1
    return 0
