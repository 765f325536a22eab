"""The calculator env server: a tool-using agent with one tool, `multiply`; the episode ends with
the model's text answer, scored from the task id. Prompts are short on purpose (the tool demo
trains a 135M model on a CPU: every prompt token is paid for in every step).

    openrft env serve reference_envs.calculator.server:app --port 8005
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import Agent, EvaluationResult, RolloutTask, create_env_app, tool_agent
from reference_envs.calculator.dataset import problem
from reference_envs.calculator.evaluator import grade

SYSTEM_PROMPT = "Multiply with the tool, one step at a time, then answer with the number."


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
    task_id = task.task_metadata.get("task_id")
    return None if task_id is None else grade(messages, problem(str(task_id)).answer)


def build_agent(*, max_turns: int = 4) -> Agent:
    return tool_agent([multiply], evaluator=score, max_turns=max_turns, system_prompt=SYSTEM_PROMPT)


def create_app(*, max_turns: int = 4, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return create_env_app(build_agent(max_turns=max_turns), name="calculator", **server_options)


agent = build_agent()
app = create_app()
