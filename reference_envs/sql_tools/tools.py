"""The four tools the model gets, bound per rollout to that task's database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from env_sdk import RolloutTask, ToolError
from reference_envs.sql_tools.database import (
    MAX_ROWS,
    SCHEMA,
    open_database,
    run_select,
)

SUBMIT = "submit_answer"


def make_tools(task: RolloutTask) -> list[Callable[..., Any]]:
    """Tools over the shop database built from ``task_metadata["seed"]``."""
    seed = task.task_metadata.get("seed")
    if not isinstance(seed, int):
        raise ValueError(f"sql_tools: task_metadata.seed must be an integer (the database seed), got {seed!r}")
    db = open_database(seed)

    def list_tables() -> str:
        """List the tables in the shop database."""
        return ", ".join(SCHEMA)

    def describe_table(table: str) -> str:
        """Show the CREATE TABLE statement (columns and types) of one table.

        Args:
            table: the table name, e.g. "orders".
        """
        if table not in SCHEMA:
            raise ToolError(f"no table {table!r}; tables: {', '.join(SCHEMA)}")
        return SCHEMA[table]

    def run_query(sql: str) -> str:
        """Run one read-only SQL query (SQLite dialect) and return its result as JSON.

        Args:
            sql: a single SELECT statement.
        """
        try:
            columns, rows, cut = run_select(db, sql)
        except sqlite3.Error as exc:
            raise ToolError(f"query failed: {exc}") from None
        result: dict[str, Any] = {"columns": columns, "rows": [list(r) for r in rows]}
        if cut:
            result["note"] = f"only the first {MAX_ROWS} rows are shown"
        return json.dumps(result)

    def submit_answer(answer: str | float) -> str:
        """Submit the final answer to the question. This ends the task.

        Args:
            answer: just the answer: a number or a name.
        """
        return "Answer submitted."

    return [list_tables, describe_table, run_query, submit_answer]
