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

Modules: `_limits` (the limits, the result, the launcher's rlimits, throw-away uids),
`_isolation` (which isolation runs here, the command that wraps the child in it), `_run` (one run
from its folders to its result). All but SANDBOX_DIR are also importable from `env_sdk`.
"""

from env_sdk.sandbox._isolation import SANDBOX_DIR, available_isolation
from env_sdk.sandbox._limits import (
    Isolation,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
)
from env_sdk.sandbox._run import run_python, run_python_async

__all__ = [
    "SANDBOX_DIR",
    "Isolation",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "available_isolation",
    "run_python",
    "run_python_async",
]
