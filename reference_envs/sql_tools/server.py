"""The sql_tools env server: a tool-using agent over a read-only SQLite shop.

    openrft env serve reference_envs.sql_tools.server:app --port 8002
    openrft env serve reference_envs.sql_tools.server:agent --port 8002 --token SECRET
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import Agent, EvaluationResult, RolloutTask, create_env_app, tool_agent
from reference_envs.sql_tools.dataset import question
from reference_envs.sql_tools.evaluator import grade
from reference_envs.sql_tools.tools import SUBMIT, make_tools

SYSTEM_PROMPT = (
    "You are a data analyst with read-only access to a shop's SQLite database (tables: customers, "
    "products, orders). Use list_tables, describe_table and run_query to find the answer, then call "
    "submit_answer with just the answer."
)


def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
    """Score from the env's own data: the seed rebuilds the database, the task id picks the
    reference query. Without them the env reports no reward (the trainer-side evaluator decides)."""
    meta = task.task_metadata
    if not isinstance(meta.get("seed"), int) or not isinstance(meta.get("task_id"), str):
        return None
    return grade(messages, question(meta["seed"], meta["task_id"]).answer)


def build_agent(*, max_turns: int = 8) -> Agent:
    return tool_agent(make_tools, evaluator=score, max_turns=max_turns, stop_tools=[SUBMIT],
                      system_prompt=SYSTEM_PROMPT)


def create_app(*, max_turns: int = 8, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return create_env_app(build_agent(max_turns=max_turns), name="sql_tools", **server_options)


agent = build_agent()
app = create_app()
