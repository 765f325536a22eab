"""The json_extract env server: one model call per rollout (no tools), scored from the task id.

    openrft env serve reference_envs.json_extract.server:app --port 8003
    openrft env serve reference_envs.json_extract.server:agent --port 8003 --token SECRET
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import Agent, EvaluationResult, RolloutTask, create_env_app, tool_agent
from reference_envs.json_extract.dataset import task as extraction_task
from reference_envs.json_extract.evaluator import grade


def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
    """Score from the env's own data: the task id rebuilds the text, schema and expected fields.
    Without a task id the env reports no reward (the trainer-side evaluator decides)."""
    task_id = task.task_metadata.get("task_id")
    if task_id is None:
        return None
    t = extraction_task(str(task_id))
    return grade(messages, t.schema, t.fields)


def build_agent(*, max_turns: int = 2) -> Agent:
    return tool_agent([], evaluator=score, max_turns=max_turns)


def create_app(*, max_turns: int = 2, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return create_env_app(build_agent(max_turns=max_turns), name="json_extract", **server_options)


agent = build_agent()
app = create_app()
