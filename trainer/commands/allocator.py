"""Run the heavy commands (train, demo, eval, serve) under jemalloc when it is installed.

PyTorch allocates CPU tensors with malloc. glibc's malloc keeps the learner's freed activations in
a fragmented heap (and a second arena for the generation thread), so a CPU run's resident memory
grows far past what its tensors need at any moment: on SmolLM2-135M the learner's step peaked
about 1.2 GB over the loaded model under glibc and 0.8 GB under jemalloc, at the same speed (see
bench/README.md). An allocator has to be chosen before the process starts, so `openrft` re-executes
itself once with jemalloc in LD_PRELOAD, the way PyTorch's own CPU launcher
(`python -m torch.backends.xeon.run_cpu --enable-jemalloc`) does.

jemalloc runs with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1` (unless MALLOC_CONF is set): freed pages stay
with the process for reuse instead of being handed back to the kernel after a delay. With the default decay,
the generation thread of a pipelined step (async.max_staleness 2, SmolLM2) spent 40% of its time in the kernel,
taking 145 k minor page faults a second on pages just returned; with it, 0.2% and 0.4 k a second, steps went
from 9.4 s to 5.4 s, and peak RSS from 1.89 to 2.07 GB (8-step demo runs, 2-core CPU).

Kept pages are never reused well enough to stay bounded (a pipelined demo run's peak RSS grew ~19 MB
a step, to 3.8 GB at step 80), so the training loop hands them back once a step (`release_free_pages`):
memory stays at one step's high-water mark, and the pages in use fault back in once a step instead of
all the time (36-step pipelined demo runs: 7.75 s a step at a flat 1.9 GB; with a release only after
256 MB of growth, 7.96 s at 2.2 GB: no faster, within the noise). Only `openrft train` and `demo` keep
pages; the others (serve, eval, sft) run with jemalloc's default decay.

`OPENRFT_ALLOCATOR=system` keeps glibc's malloc. Without jemalloc installed (Debian/Ubuntu:
`apt-get install libjemalloc2`; `make install` does it as root) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_CHOICE = "OPENRFT_ALLOCATOR"  # "jemalloc" (default when installed) or "system"
_MARK = "OPENRFT_ALLOCATOR_PRELOADED"  # set on the re-executed process: never re-execute twice
_CONF_MARK = "OPENRFT_ALLOCATOR_CONF"  # set when MALLOC_CONF is ours: children do not inherit it
KEEP_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
PAGE_KEEPING_COMMANDS = frozenset({"train", "demo"})  # the commands whose training loop calls release_free_pages
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_jemalloc() -> str | None:
    """Path of libjemalloc's shared library, or None."""
    for folder in _SEARCH:
        path = Path(folder) / "libjemalloc.so.2"
        if path.is_file():
            return str(path)
    name = ctypes.util.find_library("jemalloc")
    return name if name and Path(name).is_absolute() and Path(name).is_file() else None


def preload_env(env: Mapping[str, str], keep_pages: bool = False) -> dict[str, str] | None:
    """`env` with jemalloc added to LD_PRELOAD (and, with `keep_pages`, KEEP_PAGES as MALLOC_CONF), or None
    when nothing is to change (not Linux, opted out, not installed, already preloaded)."""
    if not sys.platform.startswith("linux") or env.get(ENV_CHOICE, "jemalloc") == "system" or _MARK in env:
        return None
    lib = find_jemalloc()
    preload = env.get("LD_PRELOAD", "")
    if lib is None or "jemalloc" in preload:
        return None
    conf = {} if "MALLOC_CONF" in env or not keep_pages else {"MALLOC_CONF": KEEP_PAGES, _CONF_MARK: "1"}
    return {**env, "LD_PRELOAD": f"{lib}:{preload}" if preload else lib, _MARK: lib, **conf}


_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena


@functools.cache
def _mallctl() -> Any:
    return getattr(ctypes.CDLL(None), "mallctl", None)  # present when jemalloc is loaded


def release_free_pages() -> bool:
    """Give the free pages jemalloc kept back to the kernel (all arenas); False when jemalloc is not loaded."""
    mallctl = _mallctl()
    return mallctl is not None and mallctl(f"arena.{_ARENAS_ALL}.purge".encode(), None, None, None,
                                           ctypes.c_size_t(0)) == 0


def reexec_under_jemalloc(keep_pages: bool = False) -> None:
    """Replace this process by the same command under jemalloc, if `preload_env` says so; return
    otherwise. `keep_pages` only for commands that call `release_free_pages` as they go (PAGE_KEEPING_COMMANDS).
    In the re-executed process, LD_PRELOAD is put back as the user had it, so env servers
    and other children it starts keep their own allocator."""
    if _MARK in os.environ:
        lib = os.environ.pop(_MARK)
        if os.environ.pop(_CONF_MARK, None):
            os.environ.pop("MALLOC_CONF", None)
        rest = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != lib]
        if rest:
            os.environ["LD_PRELOAD"] = ":".join(rest)
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    env = preload_env(os.environ, keep_pages)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
