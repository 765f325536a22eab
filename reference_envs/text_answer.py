"""What the math and json_extract envs share: the model answers in text (no tools), and the env
scores the answer from its own data, which the task id in `task_metadata` rebuilds. Without a task
id the env reports no reward and the trainer-side evaluator decides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from env_sdk import Agent, EvaluationResult, RolloutTask, create_env_app, tool_agent

#: `grade_task(task_id, messages)`: the score of a finished conversation about task `task_id`.
GradeTask = Callable[[str, list[dict[str, Any]]], EvaluationResult]


def text_agent(grade_task: GradeTask, *, max_turns: int = 2) -> Agent:
    def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
        task_id = task.task_metadata.get("task_id")
        return None if task_id is None else grade_task(str(task_id), messages)

    # No tools: the model answers in text. A model that calls tools anyway is told there are none
    # and cut at max_turns.
    return tool_agent([], evaluator=score, max_turns=max_turns)


def text_app(name: str, grade_task: GradeTask, *, max_turns: int = 2, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return create_env_app(text_agent(grade_task, max_turns=max_turns), name=name, **server_options)
