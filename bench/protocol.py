"""Protocol throughput: full rollout lifecycles per second against a no-op agent.

    python bench/protocol.py                      # 1, 64, 1024 in flight; openrft vs a bare FastAPI app
    python bench/protocol.py --duration 3 --inflight 64 --stack fast
    git show 141862e:env_sdk/client.py > /tmp/old_client.py && python bench/protocol.py --baseline-client /tmp/old_client.py

A lifecycle is: POST /init, then status until terminal. Modes:
  poll   each rollout waits on its own `GET /status` (long-poll `wait_s`; the bare app answers at once)
  batch  the trainer's code path: `EnvClient.init` per rollout (the inits of one event-loop turn travel
         as one `POST /init/batch`) and one collector on `EnvClient.wait_many` (`POST /status/batch`
         long-polls) for every rollout in flight (openrft only)

With --baseline-client, rows named "baseline" run an older EnvClient against the same openrft
server, interleaved with the others: the client's before/after in one run.

The headline (last line) is the trainer's side: rollouts tracked to completion per client
CPU-second in batch mode at the highest in-flight level, against issue 7's target of 1,000/s on
one core with 1,024 in flight.

Each server runs in its own process (uvicorn, one worker), pinned to a different core than this
client where the machine has two; both processes' CPU use is reported, since at high concurrency
the client saturates first. Rows run interleaved (openrft poll, bare poll, openrft batch, again)
so that other load on the machine hits both alike. The "bare" server is the floor: FastAPI validating the same
InitRequest and answering /init and /status from a dict, nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from env_sdk import EnvClient, InitRequest, Message, RolloutMetadata  # noqa: E402

# --- servers --------------------------------------------------------------------------------


def openrft_app() -> Any:
    from env_sdk import create_env_app

    async def noop(task: Any, client: Any) -> float:
        return 1.0

    return create_env_app(noop, max_concurrency=100_000, result_ttl_s=60.0, name="bench-noop")


def bare_app() -> Any:
    """The floor: same body validation, answers from a dict, no rollout machinery."""
    from fastapi import FastAPI, Response

    app = FastAPI()
    done: dict[str, bytes] = {}
    body = b'{"terminated":true,"status":{"code":100,"message":"Rollout finished","details":[]},"info":{},"reward":1.0}'

    @app.post("/init", status_code=202)
    async def init(req: InitRequest) -> Response:
        rid = req.metadata.rollout_id
        done[rid] = body
        return Response(b'{"status":"accepted","rollout_id":"' + rid.encode() + b'"}', status_code=202,
                        media_type="application/json")

    @app.get("/status")
    async def status(rollout_id: str) -> Response:
        if rollout_id not in done:
            return Response(b'{"detail":"unknown"}', status_code=404, media_type="application/json")
        return Response(done[rollout_id], media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "protocol_version": "1", "capacity": 1, "in_flight": 0, "available": 1}

    return app


STACKS = {"plain": ("h11", "asyncio"), "fast": ("httptools", "uvloop")}


def serve(kind: str, port: int, stack: str) -> None:
    import uvicorn

    http, loop = STACKS[stack]
    app = openrft_app() if kind == "openrft" else bare_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http=http, loop=loop)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {core})


def load_client(path: Path) -> type[EnvClient]:
    """EnvClient from another copy of env_sdk/client.py (it imports env_sdk's models and errors)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_client", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-client {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EnvClient  # type: ignore[no-any-return]


def start_server(kind: str, stack: str, pin: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port), "--stack", stack],
                            preexec_fn=(lambda: _pin(1)) if pin else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{kind} server did not start")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# --- client ---------------------------------------------------------------------------------


@dataclass
class Cell:
    server: str
    mode: str
    inflight: int
    done: int = 0
    wall: float = 0.0
    init_ms: list[float] = field(default_factory=list)
    life_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.wall if self.wall else 0.0

    def share(self, cpu_s: float) -> float:
        """Fraction of one core used while measuring."""
        return cpu_s / self.wall if self.wall else float("nan")

    @property
    def per_client_cpu_s(self) -> float:
        """Lifecycles per CPU-second of this client: what one trainer core can track."""
        return self.done / self.client_cpu_s if self.client_cpu_s else float("nan")

    def per_lifecycle_ms(self, cpu_s: float) -> float:
        """CPU milliseconds per lifecycle: robust to a machine shared with other work."""
        return cpu_s * 1000 / self.done if self.done else float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


_ids = itertools.count()
#: Issue 7: the trainer's side tracks >= 1,000 rollouts to completion per second on one core.
TARGET_PER_CPU_S = 1000


def make_request(rid: str) -> InitRequest:
    md = RolloutMetadata(invocation_id="bench", experiment_id="bench", rollout_id=rid, run_id="bench", row_id="0")
    return InitRequest(metadata=md, messages=[Message(role="user", content="noop")],
                       completion_params={"model": "policy"})


async def run_cell(env: EnvClient, cell: Cell, duration: float, linger_s: float, measure: bool) -> None:
    stop_at = time.monotonic() + duration
    prefix = f"{cell.server}-{cell.mode}-{cell.inflight}-{'m' if measure else 'w'}-"
    pending: dict[str, asyncio.Future[float]] = {}
    new_work = asyncio.Event()

    failure: list[BaseException] = []

    async def collector() -> None:  # runs until cancelled, once every worker is done
        try:
            while True:
                if not pending:
                    new_work.clear()
                    await new_work.wait()
                got = await env.wait_many(list(pending), timeout_s=2.0, linger_s=linger_s)
                now = time.perf_counter()
                for rid in got:
                    fut = pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)
        except Exception as exc:  # hand it to the workers instead of leaving them waiting
            failure.append(exc)
            for fut in pending.values():
                fut.set_exception(exc)
            raise

    async def worker() -> None:
        while time.monotonic() < stop_at:
            rid = f"{prefix}{next(_ids)}"
            t0 = time.perf_counter()
            await env.init(make_request(rid))
            t1 = time.perf_counter()
            if cell.mode == "batch":
                if failure:
                    raise failure[0]
                fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                pending[rid] = fut
                new_work.set()
                t2 = await fut
            else:
                st = await env.status(rid, wait_s=5.0)
                while not st.terminated:
                    st = await env.status(rid, wait_s=5.0)
                t2 = time.perf_counter()
            if measure:
                cell.done += 1
                cell.init_ms.append((t1 - t0) * 1000)
                cell.life_ms.append((t2 - t0) * 1000)

    collecting = asyncio.create_task(collector()) if cell.mode == "batch" else None
    try:
        await asyncio.gather(*(worker() for _ in range(cell.inflight)))
    finally:
        if collecting is not None:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)


#: Cells run interleaved, round after round, so that load from elsewhere on the machine hits
#: openrft and the bare floor alike.
PLAN = [("openrft", "poll"), ("bare", "poll"), ("openrft", "batch")]


async def measure(servers: dict[str, tuple[str, int]], levels: list[int], duration: float, rounds: int,
                  linger_s: float, connections: int, baseline: type[EnvClient] | None = None) -> list[Cell]:
    """Every PLAN row at every level; with `baseline` (another EnvClient class), also its rows
    against the openrft server, named "baseline"."""
    plan = PLAN + ([("baseline", "poll"), ("baseline", "batch")] if baseline else [])
    cells = {(server, mode, n): Cell(server, mode, n) for n in levels for server, mode in plan}
    envs = {name: EnvClient(url, max_connections=connections, timeout=60) for name, (url, _) in servers.items()}
    if baseline is not None:
        envs["baseline"] = baseline(servers["openrft"][0], max_connections=connections, timeout=60)
        servers = {**servers, "baseline": servers["openrft"]}
    try:
        for n in levels:
            for r in range(rounds):
                for server, mode in plan:
                    cell, env, pid = cells[(server, mode, n)], envs[server], servers[server][1]
                    if r == 0:
                        await run_cell(env, cell, min(1.0, duration / 4), linger_s, measure=False)  # warm-up
                    c0, s0, t0 = time.process_time(), cpu_seconds(pid), time.perf_counter()
                    await run_cell(env, cell, duration / rounds, linger_s, measure=True)
                    cell.wall += time.perf_counter() - t0
                    cell.client_cpu_s += time.process_time() - c0
                    cell.server_cpu_s += cpu_seconds(pid) - s0
            for server, mode in plan:
                c = cells[(server, mode, n)]
                print(f"  {server:8s} {mode:5s} {n:5d} in flight: {c.rate:8.0f} lifecycles/s", flush=True)
    finally:
        for env in envs.values():
            await env.aclose()
    return list(cells.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inflight", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per row, over all rounds")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per in-flight level")
    p.add_argument("--stack", choices=sorted(STACKS), default="plain",
                   help="server's uvicorn stack: plain = h11 + asyncio, fast = httptools + uvloop")
    p.add_argument("--linger", type=float, default=0.01, help="linger_s of the batch mode's long-polls")
    p.add_argument("--connections", type=int, default=8,
                   help="the client's max_connections (httpx scans every pooled connection per request: few is cheaper)")
    p.add_argument("--baseline-client", type=Path, metavar="FILE",
                   help="an older env_sdk/client.py (git show REV:env_sdk/client.py > FILE): its EnvClient runs "
                        "the poll and batch rows against the same openrft server, interleaved (before/after in one run)")
    p.add_argument("--no-pin", action="store_true", help="let the OS place client and server (busy machines)")
    p.add_argument("--serve", choices=["openrft", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.stack)
        return 0

    if not args.no_pin:
        _pin(0)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        servers = {}
        for name in ("openrft", "bare"):
            procs[name], url = start_server(name, args.stack, not args.no_pin)
            servers[name] = (url, procs[name].pid)
        baseline = load_client(args.baseline_client) if args.baseline_client else None
        cells = asyncio.run(measure(servers, args.inflight, args.duration, args.rounds, args.linger,
                                    args.connections, baseline))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=20)

    http, loop = STACKS[args.stack]
    table = Table(title=f"protocol lifecycles, no-op agent (server: uvicorn {http}+{loop}, 1 worker; client: "
                        f"EnvClient, {args.connections} connections; {os.cpu_count()} cores; {args.duration:g}s per row)")
    for col in ["server", "mode", "in flight", "lifecycles/s", "init p50 ms", "init p99 ms", "life p50 ms",
                "life p99 ms", "client CPU", "server CPU", "client CPU ms/lc", "server CPU ms/lc",
                "lc per client CPU-s"]:
        table.add_column(col, justify="left" if col in ("server", "mode") else "right")
    for c in cells:
        table.add_row(c.server, c.mode, str(c.inflight), f"{c.rate:.0f}", f"{pct(c.init_ms, 0.5):.2f}",
                      f"{pct(c.init_ms, 0.99):.2f}", f"{pct(c.life_ms, 0.5):.2f}", f"{pct(c.life_ms, 0.99):.2f}",
                      f"{c.share(c.client_cpu_s):.0%}", f"{c.share(c.server_cpu_s):.0%}",
                      f"{c.per_lifecycle_ms(c.client_cpu_s):.2f}", f"{c.per_lifecycle_ms(c.server_cpu_s):.2f}",
                      f"{c.per_client_cpu_s:.0f}")
    console = Console()
    console.print(table)
    by = {(c.server, c.mode, c.inflight): c for c in cells}
    for n in args.inflight:
        o, b, ob = by[("openrft", "poll", n)], by[("bare", "poll", n)], by[("openrft", "batch", n)]
        server_ratio = o.per_lifecycle_ms(o.server_cpu_s) / b.per_lifecycle_ms(b.server_cpu_s)
        console.print(f"in flight {n:5d}: lifecycles/s openrft/bare (poll) = {o.rate / b.rate:.2f}, "
                      f"openrft batch/bare poll = {ob.rate / b.rate:.2f}; server CPU per lifecycle "
                      f"openrft/bare = {server_ratio:.2f}", soft_wrap=True)
    if args.baseline_client:
        for n in args.inflight:
            ratios = [by[("baseline", m, n)].per_lifecycle_ms(by[("baseline", m, n)].client_cpu_s)
                      / by[("openrft", m, n)].per_lifecycle_ms(by[("openrft", m, n)].client_cpu_s) for m in ("poll", "batch")]
            console.print(f"in flight {n:5d}: client CPU per lifecycle baseline/now: poll {ratios[0]:.2f}, "
                          f"batch {ratios[1]:.2f}", soft_wrap=True)
    top = by[("openrft", "batch", max(args.inflight))]
    console.print(f"trainer side (EnvClient.init + wait_many), {top.inflight} in flight: {top.per_client_cpu_s:.0f} "
                  f"rollouts per client CPU-second ({top.per_lifecycle_ms(top.client_cpu_s):.2f} ms each) = "
                  f"{top.per_client_cpu_s / TARGET_PER_CPU_S:.2f}x the {TARGET_PER_CPU_S:,}/s target", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
