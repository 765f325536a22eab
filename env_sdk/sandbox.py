"""Run untrusted Python in a subprocess with limits.

Layers, strongest available first (``isolation="auto"``):

* ``bwrap`` — bubblewrap: empty network namespace (no route to any host socket, loopback
  included), own PID namespace (every process dies with the sandbox), a root filesystem that
  holds only read-only binds of the interpreter's folders and one writable work folder (no
  ``/etc``, no grader files). Needs ``bwrap`` on PATH (Debian: ``apt-get install bubblewrap``).
* ``unshare`` — no bwrap, running as root: network and PID namespaces via util-linux
  ``unshare``, but the filesystem is the host's (world-readable files stay readable).
* ``rlimit`` — neither: resource limits, ``python -E -s``, a scrubbed environment and a
  throw-away working directory only. Say so wherever the result is reported.

In every mode the child gets ``setrlimit`` limits (CPU seconds, address space, processes, file
size, open files) and a wall-clock timeout after which its whole process group is killed.
When the caller is root the child also drops to a throw-away uid of its own (61000 and up),
because the kernel never applies the process limit to root: that is what stops a fork bomb.
Without bwrap that needs an interpreter other users can reach; where it is not (e.g. a pyenv
Python under /root), running as root raises `SandboxUnavailable` instead of running unlimited.
Output is written to files outside the sandbox (so the file-size limit also caps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Isolation = Literal["auto", "bwrap", "unshare", "rlimit"]

#: Where the work folder appears inside a bwrap sandbox.
SANDBOX_DIR = "/sandbox"

_UID_BASE = 61000
_UID_COUNT = 4096


class SandboxUnavailable(RuntimeError):
    """The isolation that was asked for cannot run on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``memory_mb`` is the address-space limit of each process."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_chars: int = 100_000

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_open_files",
                     "max_output_chars"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb must be at least 64 (Python needs it), got {self.memory_mb}")
        if self.max_open_files < 16:
            raise ValueError(f"SandboxLimits.max_open_files must be at least 16, got {self.max_open_files}")


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None
    """The child's exit status; negative = killed by that signal; None = killed at the wall clock."""
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str
    """Which isolation ran: ``bwrap``, ``unshare`` or ``rlimit`` (see the module docstring)."""
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for a grader's reason: how the run ended."""
        if self.timed_out:
            return f"killed at the wall-clock limit after {self.wall_s:.1f}s"
        code = self.exit_code
        if code is not None and code < 0:
            sig = _signal_name(-code) or f"signal {-code}"
            hint = {"SIGXCPU": " (CPU-time limit)", "SIGXFSZ": " (file-size limit)"}.get(sig, "")
            return f"killed by {sig}{hint}"
        if code == 0:
            return "exited 0"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"exited {code}: {last[0][:300]}"


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


# --- what the child runs before the untrusted code ---------------------------------------

# Runs as the (trusted) first program inside the sandbox: set the limits (soft = hard, so the
# code cannot raise them), drop to the sandbox uid if one is given, then exec a fresh
# interpreter on the untrusted program.
_LAUNCHER = """\
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.execv(cfg["argv"][0], cfg["argv"])
"""


def _interpreter() -> str:
    """The base interpreter (not a venv's launcher: the venv and the project stay outside)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _rlimits(limits: SandboxLimits, uid: int | None) -> dict[str, tuple[int, int]]:
    mb = 1024 * 1024
    nproc = limits.max_processes
    if uid is None and os.getuid() != 0:
        # Without a uid of its own, the process count is shared with every process of the caller.
        nproc += _count_processes(os.getuid())
    out = {
        "RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),
        "RLIMIT_AS": (limits.memory_mb * mb, limits.memory_mb * mb),
        "RLIMIT_FSIZE": (limits.max_file_mb * mb, limits.max_file_mb * mb),
        "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
        "RLIMIT_CORE": (0, 0),
    }
    if uid is not None or os.getuid() != 0:  # root ignores RLIMIT_NPROC; see the module docstring
        out["RLIMIT_NPROC"] = (nproc, nproc)
    return out


def _count_processes(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


def _reachable_by_others(path: str) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in Path(path).parents)


class _UidPool:
    """Throw-away uids, one per concurrent run, so that each run's process limit is its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()
        self._next = 0

    def acquire(self) -> int:
        with self._lock:
            for _ in range(_UID_COUNT):
                uid = _UID_BASE + self._next
                self._next = (self._next + 1) % _UID_COUNT
                if uid not in self._used:
                    self._used.add(uid)
                    return uid
        raise SandboxUnavailable(f"more than {_UID_COUNT} sandboxes running at once")

    def release(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)


_UIDS = _UidPool()


def _ro_binds() -> list[str]:
    """bwrap arguments that expose the interpreter (and the shared libraries it loads) read-only."""
    args: list[str] = []
    seen: set[str] = set()
    paths = [sys.base_prefix, os.path.dirname(_interpreter()), "/usr/lib", "/usr/lib64", "/lib", "/lib64",
             "/usr/local/lib"]
    for path in paths:
        if path in seen or not os.path.lexists(path):
            continue
        seen.add(path)
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path) and not any(path.startswith(p + "/") for p in seen if p != path):
            # Folders above the bind exist in the sandbox only as empty, traversable ones
            # (on the host they may be closed, e.g. /root for a pyenv interpreter).
            for parent in reversed(Path(path).parents[:-1]):
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", path, path]
    return args


def _bwrap_command(work: str, inner: list[str], as_root: bool) -> list[str]:
    if as_root:
        # Real root needs no user namespace; keeping the init namespace lets the launcher drop to
        # a real unprivileged uid (the only way RLIMIT_NPROC applies). Only SETUID/SETGID are
        # kept, and lost at that setuid.
        ns = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
              "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        ns = ["--unshare-all"]
    return [
        "bwrap", *ns, "--die-with-parent", "--new-session",
        *_ro_binds(),
        "--proc", "/proc", "--dev", "/dev",
        "--bind", work, SANDBOX_DIR, "--chdir", SANDBOX_DIR,
        "--clearenv", "--setenv", "HOME", SANDBOX_DIR, "--setenv", "TMPDIR", SANDBOX_DIR,
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
        "--", *inner,
    ]


@functools.cache
def _probe(kind: str) -> bool:
    """Whether `kind` isolation actually starts here (checked once per process)."""
    py = _interpreter()
    with tempfile.TemporaryDirectory() as work:
        if kind == "bwrap":
            if not shutil.which("bwrap"):
                return False
            cmd = _bwrap_command(work, [py, "-I", "-c", "pass"], os.getuid() == 0)
        elif kind == "unshare":
            if os.getuid() != 0 or not shutil.which("unshare"):
                return False
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", py, "-I", "-c", "pass"]
        else:
            return True
        try:
            return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def available_isolation() -> str:
    """The strongest isolation that runs on this machine: ``bwrap``, ``unshare`` or ``rlimit``."""
    for kind in ("bwrap", "unshare"):
        if _probe(kind):
            return kind
    return "rlimit"


@dataclass
class _Run:
    cmd: list[str]
    work: str
    io_dir: str
    uid: int | None
    isolation: str
    limits: SandboxLimits

    def open_io(self) -> tuple[int, int, int]:
        stdin = os.open(os.path.join(self.io_dir, "stdin"), os.O_RDONLY)
        stdout = os.open(os.path.join(self.io_dir, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stderr = os.open(os.path.join(self.io_dir, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return stdin, stdout, stderr

    def finish(self, exit_code: int | None, timed_out: bool, started: float) -> SandboxResult:
        if self.isolation != "rlimit" and exit_code is not None and exit_code > 128 \
                and _signal_name(exit_code - 128):
            exit_code = 128 - exit_code  # bwrap/unshare report a child's fatal signal as 128 + signal
        try:
            return SandboxResult(
                exit_code=exit_code,
                stdout=self._read("stdout"),
                stderr=self._read("stderr"),
                timed_out=timed_out,
                isolation=self.isolation,
                wall_s=time.monotonic() - started,
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
            _UIDS.release(self.uid)


def _prepare(code: str, stdin: str, files: dict[str, str] | None, limits: SandboxLimits,
             isolation: Isolation) -> _Run:
    if isolation == "auto":
        kind = available_isolation()
    else:
        if not _probe(isolation):
            raise SandboxUnavailable(
                f"sandbox isolation {isolation!r} does not run here"
                + (" (install bubblewrap: apt-get install bubblewrap)" if isolation == "bwrap" else "")
            )
        kind = isolation
    # A uid of its own (see the module docstring) needs the interpreter reachable by that uid;
    # bwrap makes it so, the other modes only where no folder on its path is closed to others.
    # Root without one would run with no process limit at all: refuse rather than pretend.
    as_root = os.getuid() == 0
    if as_root and kind != "bwrap" and not _reachable_by_others(_interpreter()):
        raise SandboxUnavailable(
            f"cannot sandbox as root without bwrap: the interpreter {_interpreter()} is in a folder other users "
            "cannot enter, so the code could not drop to its own uid and no process limit would apply "
            "(install bubblewrap: apt-get install bubblewrap; or run as a non-root user)")
    uid = _UIDS.acquire() if as_root else None
    work = tempfile.mkdtemp(prefix="openrft-sandbox-")
    io_dir = tempfile.mkdtemp(prefix="openrft-sandbox-io-")
    try:
        for name, content in {**(files or {}), "main.py": code}.items():
            path = Path(work, name).resolve()
            if Path(work).resolve() not in path.parents:
                raise ValueError(f"sandbox file name {name!r} leaves the work folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
        Path(io_dir, "stdin").write_text(stdin, encoding="utf-8")
        if uid is not None:
            for root, dirs, names in os.walk(work):
                for n in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in names)]:
                    os.chown(n, uid, uid)
        os.chmod(work, 0o700)
        py = _interpreter()
        cwd = SANDBOX_DIR if kind == "bwrap" else work
        # -E -s: ignore PYTHON* variables and the user site (-I minus "no script folder on
        # sys.path": the files written beside main.py must be importable).
        target = [py, "-E", "-s", "-X", "utf8", os.path.join(cwd, "main.py")]
        launcher = [py, "-I", "-S", "-c", _LAUNCHER, json.dumps({"rlimits": _rlimits(limits, uid), "uid": uid,
                                                                 "argv": target})]
        if kind == "bwrap":
            cmd = _bwrap_command(work, launcher, as_root)
        elif kind == "unshare":
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", *launcher]
        else:
            cmd = launcher
        return _Run(cmd=cmd, work=work, io_dir=io_dir, uid=uid, isolation=kind, limits=limits)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)
        if uid is not None:
            _UIDS.release(uid)
        raise


def _env(run: _Run) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": run.work, "TMPDIR": run.work, "LANG": "C.UTF-8"}


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
    fds = run.open_io()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(run.cmd, stdin=fds[0], stdout=fds[1], stderr=fds[2], cwd=run.work,
                                env=_env(run), start_new_session=True)
    except BaseException:
        run.cleanup()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    try:
        exit_code: int | None = proc.wait(timeout=limits.wall_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        exit_code, timed_out = None, True
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return run.finish(exit_code, timed_out, started)


async def run_python_async(code: str, *, stdin: str = "", files: dict[str, str] | None = None,
                           limits: SandboxLimits | None = None, isolation: Isolation = "auto") -> SandboxResult:
    """`run_python` for event loops: waits on the child without blocking the loop."""
    limits = limits or SandboxLimits()
    run = await asyncio.to_thread(_prepare, code, stdin, files, limits, isolation)
    fds = run.open_io()
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(*run.cmd, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                                    cwd=run.work, env=_env(run), start_new_session=True)
    except BaseException:
        run.cleanup()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    try:
        try:
            exit_code: int | None = await asyncio.wait_for(proc.wait(), timeout=limits.wall_s)
            timed_out = False
        except asyncio.TimeoutError:
            exit_code, timed_out = None, True
        finally:
            _kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    except BaseException:  # cancelled: the child is dead, remove its folders
        run.cleanup()
        raise
    return await asyncio.to_thread(run.finish, exit_code, timed_out, started)
