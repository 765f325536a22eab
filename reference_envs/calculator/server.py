"""The calculator env server: a tool-using agent with add, subtract, multiply and submit_answer,
scored from the task id.

    openrft env serve reference_envs.calculator.server:app --port 8005
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from env_sdk import Agent, EvaluationResult, RolloutTask, create_env_app, tool_agent
from reference_envs.calculator.dataset import problem
from reference_envs.calculator.evaluator import SUBMIT, grade

SYSTEM_PROMPT = "You are a careful assistant. Do arithmetic only with the tools, one step at a time."


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


def subtract(a: int, b: int) -> int:
    """Subtract b from a.

    Args:
        a: the number to subtract from.
        b: the number to subtract.
    """
    return a - b


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a * b


def submit_answer(answer: int) -> str:
    """Submit the final result. This ends the task.

    Args:
        answer: the result, a whole number.
    """
    return "Answer submitted."


def score(task: RolloutTask, messages: list[dict[str, Any]]) -> EvaluationResult | None:
    task_id = task.task_metadata.get("task_id")
    return None if task_id is None else grade(messages, problem(str(task_id)).answer)


def build_agent(*, max_turns: int = 5) -> Agent:
    return tool_agent([add, subtract, multiply, submit_answer], evaluator=score, max_turns=max_turns,
                      stop_tools=[SUBMIT], system_prompt=SYSTEM_PROMPT)


def create_app(*, max_turns: int = 5, **server_options: Any) -> FastAPI:
    """The app; `server_options` go to `create_env_app` (max_concurrency, deadline_s, token)."""
    return create_env_app(build_agent(max_turns=max_turns), name="calculator", **server_options)


agent = build_agent()
app = create_app()
