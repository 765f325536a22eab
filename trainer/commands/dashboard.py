"""`openrft dashboard [RUNS_DIR] --port P`: the local dashboard over one run directory or a folder of them.

It only reads files, so it shows a live run (the page polls), a finished one, and one whose trainer
died. `openrft train ... --dashboard [PORT]` starts the same page beside the training loop
(`serve_in_thread`). Loopback by default: the page has no authentication.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from trainer.dashboard import create_dashboard_app

DEFAULT_PORT = 8765


def _server(runs_dir: Path, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(create_dashboard_app(runs_dir), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off")
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(runs_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> Iterator[str]:
    """Serve the dashboard from a daemon thread (its own loop: a busy training loop never stalls the page)
    while the block runs; yields its URL."""
    server = _server(runs_dir, host, port)
    thread = threading.Thread(target=server.run, name="openrft-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise OSError(f"the dashboard could not listen on {host}:{port} (port in use?)")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft dashboard", description="a live local page over run directories")
    parser.add_argument("runs_dir", nargs="?", default="runs", type=Path,
                        help="a run directory, or a folder of them (default: runs)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (the page has no auth)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"openrft dashboard: {args.runs_dir}: not a directory", file=sys.stderr)
        return 2
    print(f"openrft dashboard: http://{args.host}:{args.port}/ over {args.runs_dir.resolve()} (Ctrl-C stops)", flush=True)
    _server(args.runs_dir, args.host, args.port).run()
    return 0
