"""One sandboxed run: its folders and files, the child started in its isolation under its
limits, killed at the wall clock with its whole process group, and its output read back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from env_sdk.sandbox._isolation import SANDBOX_DIR, available_isolation, probe, wrap
from env_sdk.sandbox._limits import (
    LAUNCHER,
    UIDS,
    Isolation,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    interpreter,
    reachable_by_others,
    rlimits,
    signal_name,
)


@dataclass
class _Run:
    work: str
    io_dir: str
    uid: int | None
    isolation: str
    limits: SandboxLimits
    cmd: list[str] = field(default_factory=list)
    started: float = 0.0

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": self.work, "TMPDIR": self.work, "LANG": "C.UTF-8"}

    @contextlib.contextmanager
    def child_io(self) -> Iterator[tuple[int, int, int]]:
        """The child's stdin, stdout and stderr (files outside the sandbox, so the file-size limit
        also caps its output), closed here once the child holds them. Starts the wall clock; a
        child that fails to start leaves nothing behind."""
        stdin = os.open(os.path.join(self.io_dir, "stdin"), os.O_RDONLY)
        stdout = os.open(os.path.join(self.io_dir, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stderr = os.open(os.path.join(self.io_dir, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.started = time.monotonic()
        try:
            yield stdin, stdout, stderr
        except BaseException:
            self.cleanup()
            raise
        finally:
            for fd in (stdin, stdout, stderr):
                os.close(fd)

    def finish(self, exit_code: int | None, timed_out: bool) -> SandboxResult:
        if self.isolation != "rlimit" and exit_code is not None and exit_code > 128 \
                and signal_name(exit_code - 128):
            exit_code = 128 - exit_code  # bwrap/unshare report a child's fatal signal as 128 + signal
        try:
            return SandboxResult(
                exit_code=exit_code,
                stdout=self._read("stdout"),
                stderr=self._read("stderr"),
                timed_out=timed_out,
                isolation=self.isolation,
                wall_s=time.monotonic() - self.started,
            )
        finally:
            self.cleanup()

    def _read(self, name: str) -> str:
        with open(os.path.join(self.io_dir, name), "rb") as f:
            data = f.read(self.limits.max_output_chars * 4)
        return data.decode("utf-8", errors="replace")[: self.limits.max_output_chars]

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.io_dir, ignore_errors=True)
        if self.uid is not None:
            UIDS.release(self.uid)


def _prepare(code: str, stdin: str, files: dict[str, str] | None, limits: SandboxLimits,
             isolation: Isolation) -> _Run:
    if isolation == "auto":
        kind = available_isolation()
    else:
        if not probe(isolation):
            raise SandboxUnavailable(
                f"sandbox isolation {isolation!r} does not run here"
                + (" (install bubblewrap: apt-get install bubblewrap)" if isolation == "bwrap" else "")
            )
        kind = isolation
    # A uid of its own (see env_sdk.sandbox) needs the interpreter reachable by that uid;
    # bwrap makes it so, the other modes only where no folder on its path is closed to others.
    # Root without one would run with no process limit at all: refuse rather than pretend.
    as_root = os.getuid() == 0
    py = interpreter()
    if as_root and kind != "bwrap" and not reachable_by_others(py):
        raise SandboxUnavailable(
            f"cannot sandbox as root without bwrap: the interpreter {py} is in a folder other users "
            "cannot enter, so the code could not drop to its own uid and no process limit would apply "
            "(install bubblewrap: apt-get install bubblewrap; or run as a non-root user)")
    uid = UIDS.acquire() if as_root else None
    run = _Run(work=tempfile.mkdtemp(prefix="openrft-sandbox-"), io_dir=tempfile.mkdtemp(prefix="openrft-sandbox-io-"),
               uid=uid, isolation=kind, limits=limits)
    work = run.work
    try:
        for name, content in {**(files or {}), "main.py": code}.items():
            path = Path(work, name).resolve()
            if Path(work).resolve() not in path.parents:
                raise ValueError(f"sandbox file name {name!r} leaves the work folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
        Path(run.io_dir, "stdin").write_text(stdin, encoding="utf-8")
        if uid is not None:
            for root, dirs, names in os.walk(work):
                for n in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in names)]:
                    os.chown(n, uid, uid)
        os.chmod(work, 0o700)
        cwd = SANDBOX_DIR if kind == "bwrap" else work
        # -E -s: ignore PYTHON* variables and the user site (-I minus "no script folder on
        # sys.path": the files written beside main.py must be importable).
        target = [py, "-E", "-s", "-X", "utf8", os.path.join(cwd, "main.py")]
        launcher = [py, "-I", "-S", "-c", LAUNCHER, json.dumps({"rlimits": rlimits(limits, uid), "uid": uid,
                                                                "argv": target})]
        run.cmd = wrap(kind, work, launcher)
        return run
    except BaseException:
        run.cleanup()
        raise


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_python(code: str, *, stdin: str = "", files: dict[str, str] | None = None,
               limits: SandboxLimits | None = None, isolation: Isolation = "auto") -> SandboxResult:
    """Run `code` as ``main.py`` in a fresh sandbox; `files` (name -> text) are written beside it.

    Never raises for anything the code does (crash, timeout, limit); raises `SandboxUnavailable`
    when the requested isolation cannot run here.
    """
    limits = limits or SandboxLimits()
    run = _prepare(code, stdin, files, limits, isolation)
    with run.child_io() as (child_in, child_out, child_err):
        proc = subprocess.Popen(run.cmd, stdin=child_in, stdout=child_out, stderr=child_err, cwd=run.work,
                                env=run.env(), start_new_session=True)
    try:
        exit_code: int | None = proc.wait(timeout=limits.wall_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        exit_code, timed_out = None, True
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return run.finish(exit_code, timed_out)


async def run_python_async(code: str, *, stdin: str = "", files: dict[str, str] | None = None,
                           limits: SandboxLimits | None = None, isolation: Isolation = "auto") -> SandboxResult:
    """`run_python` for event loops: waits on the child without blocking the loop."""
    limits = limits or SandboxLimits()
    run = await asyncio.to_thread(_prepare, code, stdin, files, limits, isolation)
    with run.child_io() as (child_in, child_out, child_err):
        proc = await asyncio.create_subprocess_exec(*run.cmd, stdin=child_in, stdout=child_out, stderr=child_err,
                                                    cwd=run.work, env=run.env(), start_new_session=True)
    try:
        try:
            exit_code: int | None = await asyncio.wait_for(proc.wait(), timeout=limits.wall_s)
            timed_out = False
        except TimeoutError:
            exit_code, timed_out = None, True
        finally:
            _kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    except BaseException:  # cancelled: the child is dead, remove its folders
        run.cleanup()
        raise
    return await asyncio.to_thread(run.finish, exit_code, timed_out)
