"""`openrft`'s heavy commands re-execute themselves once under jemalloc (trainer/commands/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.commands.allocator import KEEP_PAGES, find_jemalloc, preload_env

# The child process stands in for `openrft train`: it asks to be re-executed, then reports.
CHILD = """
import ctypes, os
from trainer.commands.allocator import reexec_under_jemalloc
print("pid", os.getpid(), flush=True)
reexec_under_jemalloc(keep_pages=True)
maps = open("/proc/self/maps").read()
decay = "-"
if "libjemalloc" in maps:  # the option jemalloc read at start-up
    value, size = ctypes.c_ssize_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    ctypes.CDLL(None).mallctl(b"opt.dirty_decay_ms", ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
    decay = value.value
print("pid", os.getpid(), "jemalloc", "libjemalloc" in maps, "decay", decay,
      "LD_PRELOAD", os.environ.get("LD_PRELOAD", "-"), "MALLOC_CONF", os.environ.get("MALLOC_CONF", "-"))
"""


def _run(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 not installed (make install adds it as root)")
def test_reexec_loads_jemalloc_once_and_leaves_children_env_as_it_was() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENRFT_ALLOCATOR")}
    before, again, after = _run(env)  # the script runs twice: before and after the re-execution
    assert before.split()[1] == again.split()[1] == after.split()[1]  # execve keeps the pid: one process
    # loaded, keeping freed pages (no decay: no page-fault storm), and neither passed on to its children
    assert after.endswith("jemalloc True decay -1 LD_PRELOAD - MALLOC_CONF -")


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 not installed (make install adds it as root)")
def test_a_users_malloc_conf_is_left_as_it_is() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENRFT_ALLOCATOR")}
    *_, after = _run(env | {"MALLOC_CONF": "dirty_decay_ms:5000"})
    assert after.endswith("jemalloc True decay 5000 LD_PRELOAD - MALLOC_CONF dirty_decay_ms:5000")


def test_opt_out_and_other_platforms_keep_the_system_allocator() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"OPENRFT_ALLOCATOR": "system"}
    assert preload_env(env) is None
    lines = _run(env)
    assert len(lines) == 2 and "jemalloc False" in lines[1]  # ran once, not re-executed


def test_user_preloads_are_kept() -> None:
    lib = find_jemalloc()
    if lib is None:
        pytest.skip("libjemalloc2 not installed")
    env = preload_env({"LD_PRELOAD": "/opt/libfoo.so", "PATH": "/bin"})
    assert env is not None and env["LD_PRELOAD"] == f"{lib}:/opt/libfoo.so"
    assert preload_env({"LD_PRELOAD": lib}) is None  # already there: nothing to do
    # serve, eval, sft and bench's TRL baseline: jemalloc with its default decay (only openrft's training loop
    # releases kept pages, so only train and demo ask to keep them)
    assert "MALLOC_CONF" not in preload_env({"PATH": "/bin"})
    assert preload_env({"PATH": "/bin"}, keep_pages=True)["MALLOC_CONF"] == KEEP_PAGES


# Frees 300 MB of touched 1 MB blocks, then asks jemalloc to hand its kept pages back.
PURGE_CHILD = """
import os
from trainer.commands.allocator import reexec_under_jemalloc, release_free_pages
reexec_under_jemalloc(keep_pages=True)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
blocks = [bytearray(1 << 20) for _ in range(300)]
del blocks
kept = rss()
released = release_free_pages()
print(kept, rss(), released)
"""


def _purge(env: dict[str, str]) -> tuple[int, int, bool]:
    out = subprocess.run([sys.executable, "-c", PURGE_CHILD], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    kept, after, released = out.stdout.split()
    return int(kept), int(after), released == "True"


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 not installed (make install adds it as root)")
def test_kept_pages_go_back_to_the_kernel_when_released() -> None:
    """The training loop calls release_free_pages once a step: without it, kept pages only grow."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENRFT_ALLOCATOR", "MALLOC_CONF")}
    kept, after, released = _purge(env)
    assert released and kept - after > 200, (kept, after)  # the 300 MB freed were kept, then given back


def test_releasing_pages_is_a_no_op_without_jemalloc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"OPENRFT_ALLOCATOR": "system"}
    assert _purge(env)[2] is False
