"""What bounds a sandboxed run and how the child is held to it: the limits and the result types,
the `setrlimit` values a trusted launcher sets before it execs the untrusted program, and the
throw-away uids that give each run a process limit of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Isolation = Literal["auto", "bwrap", "unshare", "rlimit"]

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
    """Which isolation ran: ``bwrap``, ``unshare`` or ``rlimit`` (see `env_sdk.sandbox`)."""
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
            sig = signal_name(-code) or f"signal {-code}"
            hint = {"SIGXCPU": " (CPU-time limit)", "SIGXFSZ": " (file-size limit)"}.get(sig, "")
            return f"killed by {sig}{hint}"
        if code == 0:
            return "exited 0"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"exited {code}: {last[0][:300]}"


def signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


# Runs as the (trusted) first program inside the sandbox: set the limits (soft = hard, so the
# code cannot raise them), drop to the sandbox uid if one is given, then exec a fresh
# interpreter on the untrusted program.
LAUNCHER = """\
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


def interpreter() -> str:
    """The base interpreter (not a venv's launcher: the venv and the project stay outside)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def rlimits(limits: SandboxLimits, uid: int | None) -> dict[str, tuple[int, int]]:
    """What the launcher passes to `setrlimit`, by resource name."""
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
    if uid is not None or os.getuid() != 0:  # root ignores RLIMIT_NPROC; see env_sdk.sandbox
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


def reachable_by_others(path: str) -> bool:
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


UIDS = _UidPool()
