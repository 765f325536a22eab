"""Datasets: JSONL files of `env_sdk.Task` rows, and a deterministic, resumable task stream."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from env_sdk.models import Task


class DatasetError(ValueError):
    """A dataset file is missing or has a bad line; the message names file:line and the field."""


def load_tasks(path: str | Path) -> list[Task]:
    """Read one task per non-blank line. Every bad line is reported (up to 10), not just the first."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    tasks: list[Task] = []
    problems: list[str] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path}:{lineno}: not UTF-8 text: {exc.reason} at byte {exc.start}")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{lineno}: a task must be a JSON object, got {type(row).__name__}")
                continue
            try:
                tasks.append(Task.model_validate(row))
            except ValidationError as exc:
                for err in exc.errors():
                    field = ".".join(str(p) for p in err["loc"]) or "(row)"
                    problems.append(f"{path}:{lineno}: field {field!r}: {err['msg']}")
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DatasetError("\n".join(problems[:10]) + more)
    if not tasks:
        raise DatasetError(f"{path}: no tasks (the file is empty)")
    return tasks


@dataclass
class Conversation:
    """One supervised example: an OpenAI fine-tuning row (`messages`, optional `tools`) and where it
    came from (`file:line`, for errors about it)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    where: str


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read JSONL conversations (OpenAI's fine-tuning format: `messages` with `tool_calls` and `tool`
    turns, optional `tools`). Structural problems are DatasetErrors naming file:line (up to 10)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    rows: list[Conversation] = []
    problems: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        tools = row.get("tools") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            problems.append(f"{where}: field 'messages': expected a non-empty list of message objects")
        elif not any(m.get("role") == "assistant" for m in messages):
            problems.append(f"{where}: field 'messages': no assistant turn to learn from")
        elif tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            problems.append(f"{where}: field 'tools': expected a list of tool objects")
        else:
            rows.append(Conversation(messages=messages, tools=tools or None, where=where))
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DatasetError("\n".join(problems[:10]) + more)
    if not rows:
        raise DatasetError(f"{path}: no conversations (the file is empty)")
    return rows


@dataclass
class TaskStream:
    """Endless stream of dataset indices: a fresh seeded permutation each epoch (or file order).

    The state (`epoch`, `position`) is all a checkpoint needs to continue the exact same order.
    """

    size: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        """The next `n` dataset indices, wrapping into the next epoch when one runs out."""
        out: list[int] = []
        order = self._order(self.epoch)
        while len(out) < n:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            out.append(order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["size"], state["seed"], state["shuffle"]) != (self.size, self.seed, self.shuffle):
            raise DatasetError(
                "cannot resume the data order: the checkpoint was made with "
                f"size={state['size']} seed={state['seed']} shuffle={state['shuffle']}, "
                f"this run has size={self.size} seed={self.seed} shuffle={self.shuffle}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
