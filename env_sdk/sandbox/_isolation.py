"""Which isolation runs here, and the command line that wraps a program in it: bubblewrap
(`bwrap`), util-linux `unshare` (root only), or none (`rlimit`: the limits alone)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from env_sdk.sandbox._limits import interpreter

#: Where the work folder appears inside a bwrap sandbox.
SANDBOX_DIR = "/sandbox"


def _ro_binds() -> list[str]:
    """bwrap arguments that expose the interpreter (and the shared libraries it loads) read-only."""
    args: list[str] = []
    seen: set[str] = set()
    paths = [sys.base_prefix, os.path.dirname(interpreter()), "/usr/lib", "/usr/lib64", "/lib", "/lib64",
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


def wrap(kind: str, work: str, inner: list[str]) -> list[str]:
    """The command that runs `inner` in `kind` isolation with `work` as its work folder."""
    if kind == "bwrap":
        return _bwrap_command(work, inner, os.getuid() == 0)
    if kind == "unshare":
        return ["unshare", "--net", "--pid", "--fork", "--kill-child", *inner]
    return inner


@functools.cache
def probe(kind: str) -> bool:
    """Whether `kind` isolation actually starts here (checked once per process)."""
    if kind == "bwrap" and not shutil.which("bwrap"):
        return False
    if kind == "unshare" and (os.getuid() != 0 or not shutil.which("unshare")):
        return False
    if kind not in ("bwrap", "unshare"):
        return True
    with tempfile.TemporaryDirectory() as work:
        cmd = wrap(kind, work, [interpreter(), "-I", "-c", "pass"])
        try:
            return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def available_isolation() -> str:
    """The strongest isolation that runs on this machine: ``bwrap``, ``unshare`` or ``rlimit``."""
    for kind in ("bwrap", "unshare"):
        if probe(kind):
            return kind
    return "rlimit"
