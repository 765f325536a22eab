"""`openrft env serve MODULE:OBJECT`: run an env server built with the SDK.

OBJECT is either an ASGI app (e.g. the FastAPI app from `create_env_app`) or an agent function
`async def agent(task, client)`, which is wrapped with `create_env_app` and the flags below.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import uvicorn

from env_sdk.server import create_env_app
from env_sdk.status_push import TRACING_URL_ENV

_AGENT_FLAGS = ("token", "max_concurrency", "deadline", "result_ttl")


class TargetError(Exception):
    """MODULE:OBJECT cannot be served; the message says why."""


def load_target(spec: str) -> Any:
    """Import MODULE:OBJECT (the current directory is importable, as with uvicorn)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"{spec!r}: expected MODULE:OBJECT, e.g. my_env:app or my_env:agent")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def is_agent(obj: Any) -> bool:
    """An agent is an async function of two parameters (task, client); an ASGI app takes three."""
    fn = obj if inspect.isfunction(obj) or inspect.ismethod(obj) else None
    if fn is None or not inspect.iscoroutinefunction(fn):
        return False
    return len(inspect.signature(fn).parameters) == 2


def build_app(args: argparse.Namespace) -> Any:
    if args.tracing_url:  # read by create_env_app (and by eval-protocol's handler) as the module builds its app
        os.environ[TRACING_URL_ENV] = args.tracing_url
    obj = load_target(args.target)
    if is_agent(obj):
        return create_env_app(obj, max_concurrency=args.max_concurrency or 256,
                              deadline_s=args.deadline or 300.0, token=args.token,
                              result_ttl_s=args.result_ttl or 600.0, name=args.name or args.target)
    if callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj):
        given = [f"--{f.replace('_', '-')}" for f in _AGENT_FLAGS if getattr(args, f) is not None]
        if given:
            raise TargetError(f"{args.target} is an app, so {', '.join(given)} cannot apply: pass them to "
                              "create_env_app in your module, or point at the agent function instead")
        return obj
    raise TargetError(f"{args.target} is a {type(obj).__name__}; expected an ASGI app (create_env_app(...)) or "
                      "an agent function `async def agent(task, client)`")


def _serve_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """One process per worker, each on its own port: rollout state lives in a process, so one
    port shared by several processes would answer /status from the wrong one."""
    children: list[subprocess.Popen[bytes]] = []
    for i in range(args.workers):
        port = args.port + i
        children.append(subprocess.Popen([sys.executable, "-m", "env_sdk.cli", *_replace(argv, port)]))
        print(f"worker {i}: http://{args.host}:{port}", flush=True)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    exited: list[int] = []
    try:
        while not exited:  # until a worker dies on its own, or we are stopped
            exited = [c.returncode for c in children if c.poll() is not None]
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            c.wait(timeout=15)
    return next((rc for rc in exited if rc), 0)


def _replace(argv: list[str], port: int) -> list[str]:
    """argv with --port set to `port` and --workers 1."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--port", "--workers"):
            skip = True
            continue
        if a.startswith(("--port=", "--workers=")):
            continue
        out.append(a)
    return [*out, "--port", str(port), "--workers", "1"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openrft env", description="Run env servers built with env_sdk.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve MODULE:OBJECT (an app, or an agent function to wrap)",
                       description=__doc__)
    s.add_argument("target", metavar="MODULE:OBJECT")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1,
                   help="processes, each on its own port (port, port+1, ...): give the trainer every URL")
    s.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` (agent targets)")
    s.add_argument("--max-concurrency", type=int, default=None, help="rollouts at once (agent targets; 256)")
    s.add_argument("--deadline", type=float, default=None, help="default per-rollout deadline, s (agent; 300)")
    s.add_argument("--result-ttl", type=float, default=None, help="seconds finished results are kept (agent; 600)")
    s.add_argument("--name", default=None, help="server name reported by /version (agent targets)")
    s.add_argument("--tracing-url", default=None, metavar="URL",
                   help="also push each finished rollout's status to URL/logs as an eval-protocol log record "
                        f"(for eval-protocol's RemoteRolloutProcessor; default ${TRACING_URL_ENV})")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def env_main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 < args.port < 65536 - args.workers + 1:
        p.error(f"--port {args.port} (with {args.workers} worker(s)) is out of range")
    try:
        app = build_app(args)  # also in the parent with several workers: fail early, once
    except TargetError as exc:
        print(f"openrft env serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return _serve_workers(args, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("env_sdk").setLevel(args.log_level.upper())
    # Rollouts are logged by env_sdk with their ids; uvicorn's line per request only at debug.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    return 0


if __name__ == "__main__":  # `python -m env_sdk.cli serve ...`, how worker processes start
    sys.exit(env_main(sys.argv[1:]))
