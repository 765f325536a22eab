"""The code env's tools: try code in the sandbox, and submit the solution."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from env_sdk import SandboxLimits, run_python_async

#: Limits for one `run_python` tool call.
TRY_LIMITS = SandboxLimits(wall_s=5.0, cpu_s=3, memory_mb=256, max_processes=16)
_SHOWN_CHARS = 2000


def make_tools(limits: SandboxLimits = TRY_LIMITS,
               gate: asyncio.Semaphore | None = None) -> list[Callable[..., Any]]:
    """`run_python` and `submit_solution`; `gate` bounds how many sandboxes run at once."""

    async def run_python(code: str) -> str:
        """Run a Python program in a sandbox (no network, no files outside its folder) and return
        its exit status, stdout and stderr.

        Args:
            code: the complete program; print what you want to see.
        """
        if gate is None:
            run = await run_python_async(code, limits=limits)
        else:
            async with gate:
                run = await run_python_async(code, limits=limits)
        return (f"{run.describe()}\nstdout:\n{run.stdout[-_SHOWN_CHARS:]}\n"
                f"stderr:\n{run.stderr[-_SHOWN_CHARS:]}")

    def submit_solution(code: str) -> str:
        """Submit the final solution: the complete function definition (with any imports it
        needs). This ends the task.

        Args:
            code: Python source defining the requested function.
        """
        return "Solution submitted."

    return [run_python, submit_solution]
