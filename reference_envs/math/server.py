"""The math env server: one model call per rollout (no tools), scored from the task id.

    openrft env serve reference_envs.math.server:app --port 8001
    openrft env serve reference_envs.math.server:agent --port 8001 --token SECRET   # with server flags
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import Agent, EvaluationResult, RolloutTask, create_env_app, tool_agent
from reference_envs.math.dataset import problem
from reference_envs.math.evaluator import grade


def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
    """Score from the env's own data: the task id rebuilds the problem and its answer.
    Without a task id the env reports no reward and the trainer-side evaluator decides."""
    task_id = task.task_metadata.get("task_id")
    if task_id is None:
        return None
    return grade(messages, problem(str(task_id)).answer)


def build_agent(*, max_turns: int = 2) -> Agent:
    # No tools: the model answers in text. A model that calls tools anyway is told there are
    # none and cut at max_turns.
    return tool_agent([], evaluator=score, max_turns=max_turns)


def create_app(*, max_turns: int = 2, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return create_env_app(build_agent(max_turns=max_turns), name="math", **server_options)


agent = build_agent()
app = create_app()
