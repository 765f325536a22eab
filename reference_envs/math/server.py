"""The math env server: one model call per rollout (no tools), scored from the task id.

    openrft env serve reference_envs.math.server:app --port 8001
    openrft env serve reference_envs.math.server:agent --port 8001 --token SECRET   # with server flags
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import EvaluationResult
from reference_envs.math.dataset import problem
from reference_envs.math.evaluator import grade
from reference_envs.text_answer import text_agent, text_app


def grade_task(task_id: str, messages: list[dict[str, Any]]) -> EvaluationResult:
    """The task id rebuilds the problem and its answer."""
    return grade(messages, problem(task_id).answer)


def create_app(*, max_turns: int = 2, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return text_app("math", grade_task, max_turns=max_turns, **server_options)


agent = text_agent(grade_task)
app = create_app()
