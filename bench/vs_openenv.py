"""Env servers under load: an openrft env server vs OpenEnv's echo env vs a bare FastAPI app.

Like with like: one OpenEnv HTTP episode (`POST /reset` + `POST /step`) against one openrft
rollout (`POST /init` + `GET /status` until terminal, no-op agent), and a bare FastAPI app that
answers `/init` + `/status` with the protocol models as the floor. Each server runs under uvicorn
in its own subprocess with the same worker count and HTTP implementation; this process is the
load generator (one `httpx.AsyncClient`, closed loop: C coroutines each start the next episode as
soon as the last one ends).

The figure that matters is episodes per second per *server* core: episodes completed in the
window divided by the CPU seconds the server's processes spent in it. On a small machine the
client saturates before the server does, so wall-clock episodes/s alone would compare clients.
A second table calls each app in-process through ASGI (no sockets, no HTTP parsing, CPU time
only): the app's own cost per episode, steady even on a busy machine.

    python bench/vs_openenv.py                       # 1, 64, 1024 concurrent; 3 rounds x 3 s a point
    python bench/vs_openenv.py --concurrency 1 64 --duration 3 --workers 2

Baseline: `pip install -e '.[bench]'` (openenv-core 0.3.0). The last line printed holds the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

if __package__ in (None, ""):  # run as `python bench/vs_openenv.py`: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from env_sdk.models import InitRequest, InitResponse, Status, StatusResponse

REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("bare", "openrft", "openenv")
BASELINE_INSTALL = "pip install -e '.[bench]'   # or: pip install openenv-core==0.3.0"


# --- the three servers (factories, so uvicorn can import them by name in its own process) ------


def bare_app() -> Any:
    """The floor: idiomatic FastAPI with the protocol models, no SDK. Rollouts end at once."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI()
    finished: dict[str, StatusResponse] = {}

    @app.post("/init", status_code=202)
    async def init(request: InitRequest) -> InitResponse:
        rid = request.metadata.rollout_id
        finished[rid] = StatusResponse(terminated=True, status=Status.finished(), reward=1.0)
        return InitResponse(rollout_id=rid)

    @app.get("/status")
    async def status(rollout_id: str) -> StatusResponse:
        if rollout_id not in finished:
            raise HTTPException(404, f"unknown rollout_id {rollout_id!r}")
        return finished[rollout_id]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def openrft_app() -> Any:
    """An openrft env server whose agent does nothing but report reward 1."""
    from env_sdk import AgentResult, create_env_app

    async def noop_agent(task: Any, client: Any) -> AgentResult:
        return AgentResult(reward=1.0, termination_reason="stop")

    # Capacity well above the highest concurrency measured, so no request is refused.
    return create_env_app(noop_agent, max_concurrency=8192, name="bench-noop")


def openenv_app() -> Any:
    """OpenEnv's echo env (the shape of its `openenv init` template), built with its public API."""
    from openenv.core.env_server.http_server import create_app
    from openenv.core.env_server.interfaces import Environment
    from openenv.core.env_server.types import Action, Observation, State

    class EchoAction(Action):
        message: str

    class EchoObservation(Observation):
        echoed_message: str = ""
        message_length: int = 0

    class EchoEnvironment(Environment):
        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self) -> None:
            self._state = State(episode_id=str(uuid.uuid4()), step_count=0)

        def reset(self, **kwargs: Any) -> EchoObservation:
            self._state = State(episode_id=str(uuid.uuid4()), step_count=0)
            return EchoObservation(echoed_message="ready", done=False, reward=0.0)

        def step(self, action: EchoAction, **kwargs: Any) -> EchoObservation:  # type: ignore[override]
            self._state.step_count += 1
            return EchoObservation(
                echoed_message=action.message, message_length=len(action.message), done=True, reward=1.0
            )

        @property
        def state(self) -> State:
            return self._state

    return create_app(EchoEnvironment, EchoAction, EchoObservation, env_name="echo")


# --- server subprocesses -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(factory: str, port: int, workers: int, http: str) -> None:
    """Run the app that `factory` ("module:function") builds under uvicorn (in the server subprocess)."""
    import uvicorn

    uvicorn.run(
        factory,
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=workers,
        http=http,
        log_level="warning",
        access_log=False,
    )


class ServerProcess:
    """One server kind in its own `python` subprocess; knows the CPU time its processes used.
    The app comes from `factory` ("module:function"), by default this module's `<kind>_app`."""

    def __init__(self, kind: str, *, workers: int, http: str, log_dir: Path, factory: str | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{kind}.log"
        factory = factory or f"bench.vs_openenv:{kind}_app"
        code = f"from bench.vs_openenv import serve; serve({factory!r}, {self.port}, {workers}, {http!r})"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("ENABLE_WEB_INTERFACE", "false")  # OpenEnv: plain FastAPI app, no Gradio UI
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process and all its (worker) children."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- episodes ------------------------------------------------------------------------------

class Http:
    """One `httpx.AsyncClient` whose requests wait for one of `connections` slots first.

    httpcore's pool scans every queued request and every connection on each request (measured
    here: 1024 callers on one pool finished no episode at all in 3 s), so callers queue on a
    semaphore instead and the pool only ever sees as many requests as it has connections.
    """

    def __init__(self, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(limits=limits, timeout=60.0)
        self._slots = asyncio.Semaphore(connections)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        async with self._slots:
            return await self.client.get(url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        async with self._slots:
            return await self.client.post(url, **kwargs)


Episode = Callable[[Http, str], Awaitable[int]]  # returns the number of HTTP requests


class EpisodeError(RuntimeError):
    pass


def _check(r: httpx.Response, what: str) -> httpx.Response:
    if r.status_code >= 300:
        raise EpisodeError(f"{what}: HTTP {r.status_code} {r.text[:200]}")
    return r


async def openenv_episode(client: Http, base: str) -> int:
    """One OpenEnv HTTP episode: reset, then one step."""
    _check(await client.post(f"{base}/reset", json={}), "POST /reset")
    _check(await client.post(f"{base}/step", json={"action": {"message": "hello"}}), "POST /step")
    return 2


_ids = itertools.count()
POLL_S = 0.002  # wait between /status polls of a rollout that is not terminal yet


async def rollout_episode(client: Http, base: str) -> int:
    """One openrft-protocol rollout: init, then status until terminal."""
    rid = f"r{os.getpid()}-{next(_ids)}"
    body = {
        "completion_params": {"model": "policy", "max_tokens": 16},
        "messages": [{"role": "user", "content": "hello"}],
        "model_base_url": "http://127.0.0.1:9/v1",
        "api_key": "bench",
        "metadata": {"invocation_id": "i", "experiment_id": "e", "rollout_id": rid, "run_id": "r", "row_id": "0"},
    }
    _check(await client.post(f"{base}/init", json=body), "POST /init")
    requests = 1
    while True:
        r = _check(await client.get(f"{base}/status", params={"rollout_id": rid}), "GET /status")
        requests += 1
        if r.json()["terminated"]:
            return requests
        await asyncio.sleep(POLL_S)


EPISODES: dict[str, Episode] = {"bare": rollout_episode, "openrft": rollout_episode, "openenv": openenv_episode}


# --- in-process ASGI cost (no network, no HTTP parsing: what the app itself costs) ------------


@dataclass
class AsgiResponse:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class AsgiHttp:
    """Calls an ASGI app directly with the `Http` interface the episodes use. After each answer it
    yields to the event loop once, as a network round trip would (so a rollout task can run)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def _call(self, method: str, url: str, query: str = "", body: bytes = b"") -> AsgiResponse:
        path = url  # asgi_cost's episodes use base "": every url is a path
        headers = [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        status, chunks = 0, []

        async def receive() -> dict[str, Any]:
            return pending.pop() if pending else await never

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        await asyncio.sleep(0)
        return AsgiResponse(status, b"".join(chunks))

    async def get(self, url: str, params: dict[str, str] | None = None) -> AsgiResponse:
        return await self._call("GET", url, query=urlencode(params or {}))

    async def post(self, url: str, **kwargs: Any) -> AsgiResponse:
        return await self._call("POST", url, body=json.dumps(kwargs.get("json")).encode())


async def _asgi_lifespan(app: Any) -> Callable[[], Awaitable[None]]:
    """Run the app's lifespan startup; return a coroutine function that shuts it down."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {started}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return shutdown


async def asgi_cost(kind: str, *, episodes: int, concurrency: int) -> float:
    """CPU microseconds this process spends per episode calling `kind`'s app in-process."""
    app = {"bare": bare_app, "openrft": openrft_app, "openenv": openenv_app}[kind]()
    shutdown = await _asgi_lifespan(app)
    http = AsgiHttp(app)
    episode = EPISODES[kind]
    try:
        async def run_some(n: int) -> None:
            for _ in range(n):
                await episode(http, "")  # type: ignore[arg-type]

        await asyncio.gather(*(run_some(10) for _ in range(concurrency)))  # warm-up
        t0 = time.process_time()
        await asyncio.gather(*(run_some(episodes // concurrency) for _ in range(concurrency)))
        return (time.process_time() - t0) / (episodes // concurrency * concurrency) * 1e6
    finally:
        await shutdown()


# --- the load generator --------------------------------------------------------------------


@dataclass
class Point:
    kind: str
    concurrency: int
    episodes: int = 0
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def eps(self) -> float:
        return self.episodes / self.wall_s if self.wall_s else 0.0

    @property
    def eps_per_core(self) -> float:
        """Episodes per CPU-second of the server's processes."""
        return self.episodes / self.server_cpu_s if self.server_cpu_s else 0.0

    def pct_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0] * 1e3
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q) - 1] * 1e3


MAX_PHASE_S = 60.0  # cap on a warm-up or window stretched to let every session finish an episode


async def drive(
    server: ServerProcess, concurrency: int, *, connections: int, duration_s: float, warmup_s: float
) -> Point:
    """Closed loop: `concurrency` coroutines run episodes back to back.

    The warm-up lasts `warmup_s` and until `concurrency` episodes have ended (every session has
    cycled once, so a high concurrency is past its start-up wave); the window lasts `duration_s`
    and until another `concurrency` episodes have ended in it. Episodes ending in the window count.
    """
    episode = EPISODES[server.kind]
    point = Point(server.kind, concurrency)
    state = {"counting": False, "ended": 0}
    client = Http(min(connections, concurrency))

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            try:
                n = await episode(client, server.base_url)
            except (EpisodeError, httpx.HTTPError) as exc:
                if state["counting"]:
                    point.errors += 1
                    point.first_error = point.first_error or f"{type(exc).__name__}: {exc}"
                continue
            state["ended"] += 1
            if state["counting"]:
                point.episodes += 1
                point.requests += n
                point.latencies.append(time.perf_counter() - t0)

    async def wait_phase(seconds: float, done: Callable[[], bool]) -> None:
        t0 = time.perf_counter()
        while (time.perf_counter() - t0 < seconds or not done()) and time.perf_counter() - t0 < MAX_PHASE_S:
            await asyncio.sleep(0.02)

    async with client.client:
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await wait_phase(warmup_s, lambda: state["ended"] >= concurrency)
        cpu0, client0, w0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        state["counting"] = True
        await wait_phase(duration_s, lambda: point.episodes >= concurrency)
        state["counting"] = False
        point.server_cpu_s = server.cpu_seconds() - cpu0
        point.client_cpu_s = time.process_time() - client0
        point.wall_s = time.perf_counter() - w0
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return point


def baseline_missing(kind: str) -> str | None:
    """Why a server kind cannot run here, or None."""
    modules = {"openenv": "openenv.core.env_server.http_server", "openrft": "env_sdk", "bare": "fastapi"}
    try:
        module = __import__(modules[kind], fromlist=["_"])
    except ImportError as exc:
        hint = f"; install it with: {BASELINE_INSTALL}" if kind == "openenv" else ""
        return f"{kind}: cannot import {modules[kind]} ({exc}){hint}"
    if kind == "openrft" and not hasattr(module, "create_env_app"):
        return "openrft: env_sdk has no create_env_app yet"
    return None


def merge(points: list[Point]) -> Point:
    """Pool the rounds of one (kind, concurrency): totals over totals, latencies together."""
    out = Point(points[0].kind, points[0].concurrency)
    for p in points:
        out.episodes += p.episodes
        out.requests += p.requests
        out.errors += p.errors
        out.wall_s += p.wall_s
        out.server_cpu_s += p.server_cpu_s
        out.client_cpu_s += p.client_cpu_s
        out.latencies += p.latencies
        out.first_error = out.first_error or p.first_error
    return out


def run(
    kinds: list[str], concurrencies: list[int], *, workers: int = 1, http: str = "auto",
    connections: int = 8, duration_s: float = 3.0, warmup_s: float = 1.0, rounds: int = 3,
) -> list[Point]:
    """Start every kind's server (idle ones cost nothing), then for each concurrency drive the
    kinds in turn, `rounds` times in rotating order, so that the load of a shared machine
    drifting over the run falls on all kinds alike. Returns one pooled Point per (kind, c)."""
    rounds_by: dict[tuple[str, int], list[Point]] = {}
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-openenv-") as tmp:
        try:
            servers += [ServerProcess(kind, workers=workers, http=http, log_dir=Path(tmp)) for kind in kinds]
            for server in servers:  # they start side by side (OpenEnv imports Gradio: seconds)
                server.wait_ready()
            for c in concurrencies:
                for r in range(rounds):
                    for server in servers[r % len(servers):] + servers[: r % len(servers)]:
                        point = asyncio.run(
                            drive(server, c, connections=connections, duration_s=duration_s, warmup_s=warmup_s)
                        )
                        rounds_by.setdefault((server.kind, c), []).append(point)
        finally:
            for server in servers:
                server.stop()
    return [merge(rounds_by[(kind, c)]) for kind in kinds for c in concurrencies]


def ratio_line(points: list[Point], asgi_us: dict[tuple[str, int], float] | None = None) -> str:
    """openrft over each baseline: episodes per server CPU-second under load (c<N>=), and per
    CPU-second of the app called in-process (asgi-c<N>=)."""
    by = {(p.kind, p.concurrency): p for p in points}
    asgi_us = asgi_us or {}
    concurrencies = sorted({p.concurrency for p in points} | {c for _, c in asgi_us})
    parts = []
    for base in ("openenv", "bare"):
        vals = []
        for c in concurrencies:
            ours, theirs = by.get(("openrft", c)), by.get((base, c))
            if ours and theirs and theirs.eps_per_core and ours.episodes:
                vals.append(f"c{c}={ours.eps_per_core / theirs.eps_per_core:.2f}")
        for c in concurrencies:
            if ("openrft", c) in asgi_us and (base, c) in asgi_us:
                vals.append(f"asgi-c{c}={asgi_us[(base, c)] / asgi_us[('openrft', c)]:.2f}")
        if vals:
            parts.append(f"openrft/{base} {' '.join(vals)}")
    return "RATIOS (episodes per server CPU-second): " + ("; ".join(parts) or "n/a")


def table(points: list[Point]) -> str:
    head = f"{'server':<8} {'conc':>5} {'episodes':>8} {'err':>4} {'eps/s':>8} {'srv cpu%':>8} {'eps/core-s':>10} " \
           f"{'cli cpu%':>8} {'req/ep':>6} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p.kind:<8} {p.concurrency:>5} {p.episodes:>8} {p.errors:>4} {p.eps:>8.0f} "
            f"{100 * p.server_cpu_s / p.wall_s if p.wall_s else 0:>8.0f} {p.eps_per_core:>10.0f} "
            f"{100 * p.client_cpu_s / p.wall_s if p.wall_s else 0:>8.0f} "
            f"{p.requests / p.episodes if p.episodes else 0:>6.2f} {p.pct_ms(50):>8.1f} {p.pct_ms(99):>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 64, 1024])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server (same for all)")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--connections", type=int, default=8, help="client connections (requests in flight at once)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per point and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds run before each window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point (pooled)")
    parser.add_argument("--asgi-episodes", type=int, default=3000,
                        help="episodes per kind for the in-process ASGI cost (0 skips it)")
    args = parser.parse_args(argv)

    kinds = []
    for kind in args.kinds:
        if why := baseline_missing(kind):
            print(f"skipping {why}", file=sys.stderr)
        else:
            kinds.append(kind)
    if not kinds:
        return 2
    points = run(kinds, args.concurrency, workers=args.workers, http=args.http, connections=args.connections,
                 duration_s=args.duration, warmup_s=args.warmup, rounds=args.rounds)
    print(f"uvicorn workers={args.workers} http={args.http}; {os.cpu_count()} cores; "
          f"{args.rounds} interleaved rounds of {args.duration:g} s per point after {args.warmup:g} s warm-up; "
          f"one httpx.AsyncClient with {args.connections} connections (this process)")
    print(table(points))
    for p in points:
        if p.errors:
            print(f"{p.kind} c={p.concurrency}: {p.errors} failed episodes, first: {p.first_error}")
    asgi_us: dict[tuple[str, int], float] = {}
    if args.asgi_episodes:
        asgi_conc = [c for c in args.concurrency if c <= 64] or [1]
        for c in asgi_conc:
            for kind in kinds:
                asgi_us[(kind, c)] = asyncio.run(asgi_cost(kind, episodes=args.asgi_episodes, concurrency=c))
        print(f"\nin-process ASGI (no network, no HTTP parsing; {args.asgi_episodes} episodes): CPU us per episode")
        print("  ".join(f"{kind} c{c}={asgi_us[(kind, c)]:.0f}" for c in asgi_conc for kind in kinds))
    print(ratio_line(points, asgi_us))
    return 1 if any(p.errors for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
