"""The json_extract env server: one model call per rollout (no tools), scored from the task id.

    openrft env serve reference_envs.json_extract.server:app --port 8003
    openrft env serve reference_envs.json_extract.server:agent --port 8003 --token SECRET
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import EvaluationResult
from reference_envs.json_extract.dataset import task as extraction_task
from reference_envs.json_extract.evaluator import grade
from reference_envs.text_answer import text_agent, text_app


def grade_task(task_id: str, messages: list[dict[str, Any]]) -> EvaluationResult:
    """The task id rebuilds the text, the schema and the expected fields."""
    t = extraction_task(task_id)
    return grade(messages, t.schema, t.fields)


def create_app(*, max_turns: int = 2, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return text_app("json_extract", grade_task, max_turns=max_turns, **server_options)


agent = text_agent(grade_task)
app = create_app()
