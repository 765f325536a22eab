"""`openrft env serve` and `openrft conformance` as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from env_sdk import RolloutTask, create_env_app
from env_sdk.cli import env_main
from tests.helpers import free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent
BODY = {"metadata": {"invocation_id": "i", "experiment_id": "e", "rollout_id": "cli-1", "run_id": "u", "row_id": "w"}}


async def half(task: RolloutTask, client: openai.AsyncOpenAI) -> float:
    """The agent the CLI wraps."""
    return 0.5


app = create_env_app(half, name="prebuilt")
not_servable = 42


def openrft(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


@contextmanager
def running(cmd: list[str], ports: list[int]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for port in ports:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"port {port} never answered"
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_an_agent_function_with_flags() -> None:
    port = free_port()
    cmd = openrft("env", "serve", "tests.test_env_cli:half", "--port", str(port), "--token", "tk",
                  "--max-concurrency", "3", "--name", "halfenv")
    with running(cmd, [port]) as proc:
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(f"{url}/init", json=BODY).status_code == 401
        auth = {"Authorization": "Bearer tk"}
        assert httpx.post(f"{url}/init", json=BODY, headers=auth).status_code == 202
        st = httpx.get(f"{url}/status", params={"rollout_id": "cli-1", "wait_s": 5}, headers=auth).json()
        health = httpx.get(f"{url}/health").json()
        version = httpx.get(f"{url}/version").json()
        conformance = subprocess.run(openrft("conformance", url, "--token", "tk"), cwd=ROOT, capture_output=True,
                                     text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
        proc.terminate()
        logs = proc.communicate(timeout=20)[0]
    assert st["terminated"] is True and st["reward"] == 0.5
    assert health["capacity"] == 3 and version["name"] == "halfenv"
    assert conformance.returncode == 0, conformance.stdout + conformance.stderr
    assert "PASS" in conformance.stdout and "FAIL" not in conformance.stdout
    assert "rollout cli-1 started" in logs  # each rollout is logged with its id


def test_serve_a_prebuilt_app() -> None:
    port = free_port()
    with running(openrft("env", "serve", "tests.test_env_cli:app", "--port", str(port)), [port]):
        assert httpx.get(f"http://127.0.0.1:{port}/version").json()["name"] == "prebuilt"


def test_workers_each_get_their_own_port() -> None:
    ports = free_ports(2)
    with running(openrft("env", "serve", "tests.test_env_cli:half", "--port", str(ports[0]), "--workers", "2"), ports):
        for p in ports:
            url = f"http://127.0.0.1:{p}"
            assert httpx.post(f"{url}/init", json=BODY).status_code == 202
            st = httpx.get(f"{url}/status", params={"rollout_id": "cli-1", "wait_s": 5}).json()
            assert st["reward"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tests.test_env_cli"], "expected MODULE:OBJECT"),
        (["no_such_module_xyz:agent"], "cannot import module 'no_such_module_xyz'"),
        (["tests.test_env_cli:missing"], "has no attribute 'missing'"),
        (["tests.test_env_cli:not_servable"], "is a int; expected an ASGI app"),
        (["tests.test_env_cli:app", "--token", "x"], "is an app, so --token cannot apply"),
    ],
)
def test_bad_targets_are_explained(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert env_main(["serve", *args, "--port", str(free_port())]) == 2
    assert message in capsys.readouterr().err
