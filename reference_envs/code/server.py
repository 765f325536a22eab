"""The code env server: the model writes a Python function (trying code in the sandbox if it
likes); hidden unit tests, which only this server knows, score it.

    openrft env serve reference_envs.code.server:app --port 8004
    openrft env serve reference_envs.code.server:agent --port 8004 --token SECRET
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI

from env_sdk import (
    Agent,
    EvaluationResult,
    RolloutTask,
    SandboxLimits,
    create_env_app,
    tool_agent,
)
from reference_envs.code.dataset import task as code_task
from reference_envs.code.evaluator import GRADING_LIMITS, SUBMIT, agrade, submitted_code
from reference_envs.code.tools import TRY_LIMITS, make_tools

SYSTEM_PROMPT = "You are a careful Python programmer. Write correct, self-contained code."


def build_agent(*, max_turns: int = 6, grading_limits: SandboxLimits = GRADING_LIMITS,
                try_limits: SandboxLimits = TRY_LIMITS, max_sandboxes: int | None = None) -> Agent:
    """max_sandboxes: sandboxes running at once across all rollouts (default: the CPU count)."""
    gate = asyncio.Semaphore(max_sandboxes or os.cpu_count() or 1)

    async def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
        """Score from the env's own task bank: the task id rebuilds the hidden tests.
        Without a task id the env reports no reward (the trainer-side evaluator decides)."""
        task_id = task.task_metadata.get("task_id")
        if task_id is None:
            return None
        hidden = code_task(str(task_id))
        code, why = submitted_code(messages)
        if code is None:
            return EvaluationResult(score=0.0, reason=why)
        async with gate:
            return await agrade(code, hidden.function, hidden.cases, grading_limits)

    return tool_agent(make_tools(try_limits, gate), evaluator=score, max_turns=max_turns,
                      stop_tools=[SUBMIT], system_prompt=SYSTEM_PROMPT)


def create_app(*, max_turns: int = 6, grading_limits: SandboxLimits = GRADING_LIMITS,
               try_limits: SandboxLimits = TRY_LIMITS, max_sandboxes: int | None = None,
               **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    built = build_agent(max_turns=max_turns, grading_limits=grading_limits, try_limits=try_limits,
                        max_sandboxes=max_sandboxes)
    return create_env_app(built, name="code", **server_options)


agent = build_agent()
app = create_app()
