"""env_sdk.sandbox: untrusted code runs under limits, in the strongest isolation available here.

Every escape attempt below must fail inside the sandbox; the tests that need filesystem or
network isolation are skipped (with the reason) only where neither bwrap nor unshare runs."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from env_sdk.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    available_isolation,
    run_python,
    run_python_async,
)

ISOLATION = available_isolation()
needs_fs_isolation = pytest.mark.skipif(ISOLATION != "bwrap", reason="needs bwrap (apt-get install bubblewrap)")
needs_net_isolation = pytest.mark.skipif(ISOLATION == "rlimit", reason="needs bwrap or unshare (root)")


def test_runs_code_with_stdin_and_files_and_reports_isolation() -> None:
    r = run_python("import sys, helper\nprint(helper.X * int(sys.stdin.read()))",
                   stdin="3", files={"helper.py": "X = 14\n"})
    assert r.ok, r.stderr
    assert r.stdout.strip() == "42"
    assert r.isolation == ISOLATION


def test_crash_is_a_result_not_an_exception() -> None:
    r = run_python("raise ValueError('boom')")
    assert not r.ok and r.exit_code == 1
    assert "ValueError: boom" in r.describe()


def test_infinite_loop_hits_cpu_limit() -> None:
    r = run_python("while True: pass", limits=SandboxLimits(cpu_s=1, wall_s=20))
    assert not r.ok
    assert "CPU-time limit" in r.describe()  # 1 CPU second comes long before 20 s, even on a busy machine


def test_sleeping_forever_hits_wall_clock() -> None:
    r = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_s=1))
    assert r.timed_out and not r.ok and r.exit_code is None
    assert r.wall_s < 5


def test_unbounded_allocation_fails() -> None:
    r = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", limits=SandboxLimits(memory_mb=256))
    assert not r.ok and "allocated" not in r.stdout
    assert "MemoryError" in r.stderr


def test_fork_bomb_is_contained() -> None:
    code = "import os\nn = 0\nwhile True:\n    os.fork()\n"
    started = time.monotonic()
    r = run_python(code, limits=SandboxLimits(max_processes=16, wall_s=5))
    assert not r.ok
    assert time.monotonic() - started < 8
    # nothing of it survives: no process left in the sandbox uids, and a new sandbox starts fine
    if os.getuid() == 0:
        time.sleep(0.2)
        leftovers = [e.name for e in os.scandir("/proc") if e.name.isdigit() and _uid_of(e.path) in SANDBOX_UIDS]
        assert not leftovers
    assert run_python("print('alive')").stdout.strip() == "alive"


SANDBOX_UIDS = range(61000, 61000 + 4096)


def _uid_of(proc_dir: str) -> int:
    try:
        return os.stat(proc_dir).st_uid
    except OSError:
        return -1


def test_file_size_limit() -> None:
    r = run_python("open('big', 'wb').write(b'x' * 8 * 1024 * 1024)", limits=SandboxLimits(max_file_mb=1))
    assert not r.ok and ("File too large" in r.stderr or "file-size limit" in r.describe())


@needs_fs_isolation
def test_cannot_read_host_files() -> None:
    here = os.path.abspath(__file__)
    code = (f"import os\nfor p in ['/etc/passwd', {here!r}, {os.getcwd()!r}]:\n"
            "    try:\n        open(p).read(); print('READ', p)\n"
            "    except OSError as e:\n        print('denied', p, type(e).__name__)\n")
    r = run_python(code)
    assert r.ok, r.stderr
    assert "READ" not in r.stdout and r.stdout.count("denied") == 3


@needs_net_isolation
def test_cannot_reach_a_listening_loopback_server() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')")
        assert not r.ok and "CONNECTED" not in r.stdout
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_environment_is_scrubbed_and_cwd_is_a_fresh_folder() -> None:
    os.environ["OPENRFT_SECRET_FOR_TEST"] = "s3cret"
    try:
        r = run_python("import os\nprint(sorted(os.environ))\nprint(os.listdir('.'))\nopen('x', 'w').write('1')")
    finally:
        del os.environ["OPENRFT_SECRET_FOR_TEST"]
    assert r.ok, r.stderr
    assert "OPENRFT_SECRET_FOR_TEST" not in r.stdout and "s3cret" not in r.stdout
    assert "['main.py']" in r.stdout
    # the next run starts empty again
    assert "['main.py']" in run_python("import os\nprint(os.listdir('.'))").stdout


def test_output_is_capped() -> None:
    r = run_python("print('y' * 1_000_000)", limits=SandboxLimits(max_output_chars=1000))
    assert len(r.stdout) == 1000


async def test_async_runs_concurrently_without_blocking_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    results = await asyncio.gather(*(run_python_async("import time\ntime.sleep(0.5)\nprint('ok')") for _ in range(4)))
    elapsed = time.monotonic() - started
    ticking.cancel()
    assert all(r.ok and r.stdout.strip() == "ok" for r in results)
    assert elapsed < 0.75 * sum(r.wall_s for r in results)  # they overlapped
    assert ticks >= 20  # the loop kept running meanwhile


def test_bad_limits_and_unavailable_isolation_are_clear() -> None:
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=8)
    if ISOLATION != "bwrap":
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            run_python("pass", isolation="bwrap")
    with pytest.raises(ValueError, match="leaves the work folder"):
        run_python("pass", files={"../evil.py": ""})


@pytest.mark.skipif(os.getuid() != 0 or ISOLATION != "bwrap" or all(
    os.stat(p).st_mode & 0o001 for p in Path(sys.executable).resolve().parents),
    reason="only where root's interpreter sits in a folder closed to other users (e.g. pyenv under /root)")
def test_root_without_bwrap_refuses_rather_than_running_without_a_process_limit() -> None:
    with pytest.raises(SandboxUnavailable, match="no process limit"):
        run_python("pass", isolation="unshare")
