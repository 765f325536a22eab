"""Demonstrations from an env's own solver: `openrft dataset NAME --demos --n N --seed S --out F`.

An env's `dataset.py` may define ``solution(row) -> list[move]``: the assistant's moves of a correct
episode, each a text reply (str) or a tool call ``(name, arguments)``. The env's own agent
(`reference_envs.NAME.server:agent`) then plays the episode against a scripted model that makes those
moves, so the conversation holds the env's real system prompt, tool specs and tool results, and the
env's own grader scores it: a demonstration that does not score 1 is an error, never written.

Rows are OpenAI fine-tuning conversations (`messages`, `tools`) plus the task's `ground_truth` and
`metadata`, for `openrft sft`.
Demos come from the train split (never a test task) and skip every task of the files in `exclude`
(by default the env's shipped train and test files: the RFT tasks), so SFT and RFT never share a task.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion

from env_sdk import RolloutTask
from env_sdk.models import RolloutMetadata

Move = str | tuple[str, dict[str, Any]]


class _ScriptedCompletions:
    def __init__(self, moves: list[Move]) -> None:
        self.moves, self.tools = list(moves), None

    async def create(self, *, messages: list[dict[str, Any]], **kwargs: Any) -> ChatCompletion:
        if not self.moves:
            raise RuntimeError("the solver ran out of moves before the episode ended")
        self.tools = kwargs.get("tools")
        move = self.moves.pop(0)
        message: dict[str, Any] = {"role": "assistant", "content": move if isinstance(move, str) else None}
        if not isinstance(move, str):
            name, arguments = move
            message["tool_calls"] = [{"id": f"call_{len(messages)}", "type": "function",
                                      "function": {"name": name, "arguments": json.dumps(arguments)}}]
        return ChatCompletion.model_validate({
            "id": "demo", "object": "chat.completion", "created": 0, "model": "solver",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop" if isinstance(move, str) else "tool_calls"}],
        })


class ScriptedClient:
    """Just enough of `openai.AsyncOpenAI` for an env's agent: `chat.completions.create` plays `moves`."""

    def __init__(self, moves: list[Move]) -> None:
        self.completions = _ScriptedCompletions(moves)
        self.chat = self


def _task_key(row: dict[str, Any]) -> str:
    first_user = next((m.get("content") for m in row.get("messages", []) if m.get("role") == "user"), "")
    return json.dumps([first_user, (row.get("metadata") or {}).get("seed")])


def _keys(paths: Iterable[Path]) -> set[str]:
    return {_task_key(json.loads(line)) for p in paths if p.is_file() for line in p.read_text().splitlines() if line.strip()}


async def _play(agent: Any, row: dict[str, Any], number: int, solution: Any) -> dict[str, Any]:
    client = ScriptedClient(solution(row))
    ids = RolloutMetadata(invocation_id="demo", experiment_id="demo", rollout_id=f"demo-{number}", run_id="demo",
                          row_id=str(number))
    task = RolloutTask(messages=list(row["messages"]), tools=row.get("tools"), metadata=ids,
                       completion_params={"model": "solver"}, task_metadata=dict(row.get("metadata") or {}))
    result = await agent(task, client)
    if result.reward != 1.0:
        raise ValueError(f"the solver's episode for task {row.get('metadata')} scored {result.reward} "
                         f"({result.info.get('reason')}), not 1")
    out: dict[str, Any] = {"messages": result.messages, "ground_truth": row.get("ground_truth"), "metadata": {**row.get("metadata", {}), "demo": True,
                                                                        "reward": result.reward}}
    if client.completions.tools:
        out["tools"] = client.completions.tools
    return out


def demo_rows(name: str, *, n: int, seed: int, exclude: Iterable[Path] | None = None) -> list[dict[str, Any]]:
    """`n` demonstrations of env `name` (see the module docstring); ValueError for an env without a solver."""
    from reference_envs.datasets import default_path, generate

    dataset = importlib.import_module(f"reference_envs.{name}.dataset")
    solution = getattr(dataset, "solution", None)
    if solution is None:
        raise ValueError(f"{name} has no solver (a `solution(row)` in reference_envs/{name}/dataset.py): no demos")
    agent = importlib.import_module(f"reference_envs.{name}.server").agent
    skip = _keys(exclude if exclude is not None else [default_path(name, "train"), default_path(name, "test")])
    want = n + len(skip)
    while True:  # generation is a stable prefix for a seed: ask for more until n tasks survive the exclusion
        rows = [r for r in generate(name, split="train", seed=seed, n=want) if _task_key(r) not in skip][:n]
        if len(rows) == n:
            break
        want *= 2

    async def play_all() -> list[dict[str, Any]]:
        return [await _play(agent, row, k, solution) for k, row in enumerate(rows)]

    return asyncio.run(play_all())
