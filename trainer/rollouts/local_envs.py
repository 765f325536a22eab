"""Env servers the trainer runs itself: config entries `{module: MODULE:OBJECT, workers: N}`.

Each worker is `python -m env_sdk.cli serve MODULE:OBJECT --port P` (what `openrft env serve` runs),
a process of its own on a free loopback port, so `workers: 2` puts two URLs in the env pool. The
processes are started together, waited for until each answers GET /health, and stopped (SIGTERM to
the process group, SIGKILL after a grace) when the `local_envs` block is left: at the end of the run,
on an exception, on Ctrl-C. On Linux they also get SIGTERM when the trainer dies without cleaning up
(SIGKILL, a crash): PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from trainer.config import EnvEndpoint

logger = logging.getLogger("trainer.rollouts.local_envs")

HOST = "127.0.0.1"
STOP_GRACE_S = 5.0
TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1


class LocalEnvError(RuntimeError):
    """An env server the trainer started did not come up; the message names it and shows its output."""


@dataclass
class LocalEnv:
    """One env server process started here (`index`: its entry in `envs`, `worker`: its number there)."""

    entry: EnvEndpoint
    index: int
    worker: int
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_kept: bool

    @property
    def name(self) -> str:
        return f"env {self.entry.module} (envs[{self.index}], worker {self.worker}, {self.url})"

    def tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no output)"
        where = f"; all of it in {self.log_path}" if self.log_kept else ""
        return f"last lines of its output{where}:\n" + ("\n".join(lines[-TAIL_LINES:]) or "(none)")

    def send(self, sig: signal.Signals) -> None:
        """Signal its process group: the server and whatever it started (e.g. sandboxed test runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


@contextlib.contextmanager
def local_envs(endpoints: Sequence[EnvEndpoint], *, log_dir: Path | None = None) -> Iterator[list[EnvEndpoint]]:
    """Yield `endpoints` with each `module` entry replaced by the URL entries of its running workers.

    The servers are stopped when the block is left, however it is left. Enter it on a thread that
    outlives the block (the main thread): Linux's parent-death signal follows the thread that started
    the child. Output of each server goes to `log_dir/env_I_W.log` (a temporary directory if None).
    """
    if all(e.module is None for e in endpoints):
        yield list(endpoints)
        return
    with contextlib.ExitStack() as stack:
        logs = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openrft-envs-")))
        logs.mkdir(parents=True, exist_ok=True)
        servers: list[LocalEnv] = []
        stack.callback(stop_all, servers)
        for index, entry in enumerate(endpoints):
            if entry.module is None:
                continue
            for worker in range(entry.workers):
                servers.append(_start(entry, index, worker, logs / f"env_{index}_{worker}.log", log_dir is not None))
        _wait_up(servers)
        yield _resolve(endpoints, servers)


def _resolve(endpoints: Sequence[EnvEndpoint], servers: Sequence[LocalEnv]) -> list[EnvEndpoint]:
    resolved: list[EnvEndpoint] = []
    for index, entry in enumerate(endpoints):
        if entry.module is None:
            resolved.append(entry)
        else:
            resolved += [EnvEndpoint(url=s.url, token=entry.token, wait=entry.wait) for s in servers if s.index == index]
    return resolved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _serve_command(entry: EnvEndpoint, port: int) -> list[str]:
    """`openrft env serve` for one worker; the entry's `args` come last, so they override the log level."""
    assert entry.module is not None
    cmd = [sys.executable, "-m", "env_sdk.cli", "serve", entry.module, "--host", HOST, "--port", str(port),
           "--log-level", "warning"]
    if entry.token is not None:
        cmd += ["--token", entry.token]
    return [*cmd, *entry.args]


def _start(entry: EnvEndpoint, index: int, worker: int, log_path: Path, log_kept: bool) -> LocalEnv:
    port = _free_port()
    with log_path.open("wb") as log:
        process = _spawn(_serve_command(entry, port), log, {**os.environ, **entry.env})
    server = LocalEnv(entry, index, worker, f"http://{HOST}:{port}", process, log_path, log_kept)
    logger.info("started %s, pid %d, log %s", server.name, process.pid, log_path)
    return server


def _spawn(cmd: list[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C in the terminal reaches the trainer only, which then stops the servers in order.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=_death_signal_setter())


def _death_signal_setter() -> Callable[[], None] | None:
    """What the child runs before exec: on Linux, ask for SIGTERM when its parent dies. libc is
    looked up here, in the parent: loading a library between fork and exec can deadlock."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(_die_with_parent, prctl, os.getpid())


def _die_with_parent(prctl: Callable[[int, int], int], parent: int) -> None:  # pragma: no cover - in the child
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the parent died before prctl: nobody would stop this server
        os._exit(1)


def _wait_up(servers: Sequence[LocalEnv]) -> None:
    """Return once every server answers GET /health; raise LocalEnvError for the first that exits or
    is not up within its entry's startup_timeout_s. Any answer below 500 counts: apps without a
    /health route are up once they answer at all."""
    started = time.monotonic()
    pending = list(servers)
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for server in list(pending):
                if _is_up(client, server):
                    pending.remove(server)
                elif time.monotonic() - started > server.entry.startup_timeout_s:
                    raise LocalEnvError(f"{server.name} did not answer GET /health within "
                                        f"{server.entry.startup_timeout_s:g} s (startup_timeout_s); {server.tail()}")
            if pending:
                time.sleep(0.1)


def _is_up(client: httpx.Client, server: LocalEnv) -> bool:
    code = server.process.poll()
    if code is not None:
        raise LocalEnvError(f"{server.name} exited with code {code} while starting; {server.tail()}")
    try:
        return client.get(f"{server.url}/health").status_code < 500
    except httpx.HTTPError:
        return False


def stop_all(servers: Sequence[LocalEnv], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every server (uvicorn shuts down cleanly), SIGKILL what is left after `grace_s`."""
    for server in servers:
        if server.process.poll() is None:
            server.send(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for server in servers:
        server.send(signal.SIGKILL)  # the server if it hung, and children that outlived it
        server.process.wait()
