"""Questions about a shop database, each with its reference query.

A task is ``(seed, task_id)``: the seed builds the database (`database.open_database`), the
task id (``"<template>/<k>"``) picks the question and its parameter. `question(seed, task_id)`
rebuilds both and runs the reference query: that is how the env scores a rollout without the
row's ground_truth.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reference_envs.datasets import check_split, split_of
from reference_envs.sql_tools.database import open_database, run_select

KINDS: tuple[str, ...] = ()
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUCTION = "Use the tools to look at the shop's SQLite database, then call submit_answer with just the answer."


@dataclass(frozen=True)
class Question:
    seed: int
    task_id: str
    text: str
    sql: str
    params: tuple[Any, ...]
    answer: Any
    unique: bool
    """False when the reference query ties (two equally good answers): such tasks are not used."""


def _distinct(conn: sqlite3.Connection, sql: str) -> list[Any]:
    return [r[0] for r in run_select(conn, sql, max_rows=10_000)[1]]


# template -> (parameter values of this db, question text, reference query); "{p}" is the parameter.
_TEMPLATES: dict[str, tuple[Callable[[sqlite3.Connection], list[Any]], str, str]] = {
    "city_customers": (
        lambda c: _distinct(c, "SELECT DISTINCT city FROM customers ORDER BY city"),
        "How many customers live in {p}?",
        "SELECT COUNT(*) FROM customers WHERE city = ?",
    ),
    "customer_spend": (
        lambda c: _distinct(c, "SELECT DISTINCT c.name FROM customers c JOIN orders o ON o.customer_id = c.id "
                               "ORDER BY c.name"),
        "How much has {p} spent in total (quantity times unit price over all their orders)? Round to 2 decimals.",
        ("SELECT ROUND(SUM(o.quantity * p.price), 2) FROM orders o JOIN products p ON p.id = o.product_id "
         "JOIN customers c ON c.id = o.customer_id WHERE c.name = ?"),
    ),
    "month_orders": (
        lambda c: [f"{m:02d}" for m in range(1, 13)],
        "How many orders were placed in {month} 2024?",
        "SELECT COUNT(*) FROM orders WHERE strftime('%m', order_date) = ?",
    ),
    "category_priciest": (
        lambda c: _distinct(c, "SELECT DISTINCT category FROM products ORDER BY category"),
        "What is the name of the most expensive product in the {p} category?",
        "SELECT name FROM products WHERE category = ? ORDER BY price DESC LIMIT 2",
    ),
    "category_avg_price": (
        lambda c: _distinct(c, "SELECT DISTINCT category FROM products ORDER BY category"),
        "What is the average price of the products in the {p} category? Round to 2 decimals.",
        "SELECT ROUND(AVG(price), 2) FROM products WHERE category = ?",
    ),
    "best_seller": (
        lambda c: [None],
        "Which product has sold the most units in total?",
        ("SELECT p.name, SUM(o.quantity) AS units FROM orders o JOIN products p ON p.id = o.product_id "
         "GROUP BY p.id ORDER BY units DESC LIMIT 2"),
    ),
    "never_ordered": (
        lambda c: [None],
        "How many customers have never placed an order?",
        "SELECT COUNT(*) FROM customers WHERE id NOT IN (SELECT customer_id FROM orders)",
    ),
}


def question(seed: int, task_id: str, conn: sqlite3.Connection | None = None) -> Question:
    """Rebuild a task; ValueError for a task id this env never made."""
    template, _, k = task_id.partition("/")
    if template not in _TEMPLATES or not k.isdigit():
        raise ValueError(f"not a sql_tools task id: {task_id!r} (expected '<template>/<k>', "
                         f"templates: {', '.join(_TEMPLATES)})")
    conn = conn or open_database(seed)
    values, text, sql = _TEMPLATES[template]
    options = values(conn)
    p = options[int(k) % len(options)]
    params: tuple[Any, ...] = () if p is None else (p,)
    shown = MONTHS[int(p) - 1] if template == "month_orders" else p
    rows = run_select(conn, sql, params)[1]
    unique = True
    if template in ("category_priciest", "best_seller"):
        unique = len(rows) < 2 or rows[0][-1] != rows[1][-1]
    return Question(seed=seed, task_id=task_id, text=text.format(p=shown, month=shown), sql=sql, params=params,
                    answer=rows[0][0], unique=unique)


def generate(*, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    """`n` tasks of `split`, each over its own database."""
    check_split(split)
    rng = random.Random(f"sql_tools:{split}:{seed}")
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    while len(rows) < n:
        db_seed, template = rng.randrange(10**6), rng.choice(list(_TEMPLATES))
        task_id = f"{template}/{rng.randrange(100)}"
        if (db_seed, task_id) in seen or split_of(f"sql_tools:{db_seed}") != split:
            continue
        seen.add((db_seed, task_id))
        q = question(db_seed, task_id)
        if not q.unique or q.answer is None:
            continue
        rows.append({
            "messages": [{"role": "user", "content": f"{q.text}\n{INSTRUCTION}"}],
            "ground_truth": q.answer,
            "metadata": {"env": "sql_tools", "task_id": task_id, "seed": db_seed, "split": split},
        })
    return rows


def _literal(value: Any) -> str:
    return str(value) if isinstance(value, (int, float)) else "'" + str(value).replace("'", "''") + "'"


def solution(task_row: dict[str, Any]) -> list[str | tuple[str, dict[str, Any]]]:
    """The env's own solver, as the tool calls of a correct episode: list the tables, describe the one
    the reference query reads first, run the reference query (parameters inlined), submit its answer."""
    meta = task_row["metadata"]
    q = question(int(meta["seed"]), str(meta["task_id"]))
    sql = q.sql
    for p in q.params:
        sql = sql.replace("?", _literal(p), 1)
    table = sql.split(" FROM ", 1)[1].split()[0]
    return [("list_tables", {}), ("describe_table", {"table": table}), ("run_query", {"sql": sql}),
            ("submit_answer", {"answer": q.answer})]
