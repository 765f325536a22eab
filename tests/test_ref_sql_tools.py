"""reference_envs.sql_tools over real HTTP: a scripted model drives the real tools against the
real (read-only) SQLite database."""

from __future__ import annotations

import json
import sqlite3

import pytest

from reference_envs.datasets import default_path, default_rows, generate
from reference_envs.sql_tools.database import open_database, run_select
from reference_envs.sql_tools.dataset import question
from reference_envs.sql_tools.evaluator import evaluate
from reference_envs.sql_tools.server import create_app
from tests.ref_envs_util import assert_conformant, env_and_model, healthy, rollout

ROWS = generate("sql_tools", split="test", seed=11, n=12)
NUMERIC = next(r for r in ROWS if isinstance(r["ground_truth"], float))
NAMED = next(r for r in ROWS if isinstance(r["ground_truth"], str))


def _literal_sql(row: dict) -> str:
    q = question(row["metadata"]["seed"], row["metadata"]["task_id"])
    sql = q.sql
    for p in q.params:
        sql = sql.replace("?", "'" + str(p).replace("'", "''") + "'", 1)
    return sql


def _tool_results(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool"]


def solver(row: dict, *, wrong: bool = False):
    """Looks at the tables, runs the reference query through run_query, submits its first cell."""
    sql = _literal_sql(row)

    def script(messages, tools):
        done = _tool_results(messages)
        if len(done) == 0:
            return {"tool_calls": [{"name": "list_tables", "arguments": {}}]}
        if len(done) == 1:
            return {"tool_calls": [{"name": "run_query", "arguments": {"sql": sql}}]}
        answer = json.loads(done[-1])["rows"][0][0]
        return {"tool_calls": [{"name": "submit_answer",
                                "arguments": {"answer": "999999" if wrong else f"{answer}"}}]}

    return script


@pytest.mark.parametrize("row", [NUMERIC, NAMED], ids=["number", "name"])
async def test_agent_that_queries_and_submits_the_right_answer_scores_1(row) -> None:
    with env_and_model(create_app(), solver(row)) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, row)
        assert status.status.ok, status.status
        assert status.reward == 1.0, status.info
        assert status.termination_reason == "submitted"
        assert status.metrics["tool_calls"] == 3.0
        # the env advertised its four tools and a system prompt
        body = model_app.state.requests[0]["body"]
        assert {t["function"]["name"] for t in body["tools"]} == {
            "list_tables", "describe_table", "run_query", "submit_answer"}
        assert body["messages"][0]["role"] == "system"
        assert evaluate(status.messages, row["ground_truth"]).score == 1.0


async def test_wrong_answer_scores_0() -> None:
    with env_and_model(create_app(), solver(NUMERIC, wrong=True)) as (env_url, model_url, _):
        status = await rollout(env_url, model_url, NUMERIC)
        assert status.reward == 0.0 and "!=" in status.info["reason"]
        assert evaluate(status.messages, NUMERIC["ground_truth"]).score == 0.0


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ({"tool_calls": [{"name": "submit_answer", "arguments": {}}]}, "without an answer"),
        ("I think the answer is 12.", "never called"),
    ],
    ids=["submit-without-answer", "text-instead-of-submit"],
)
async def test_malformed_submission_scores_0_with_a_reason(reply, reason) -> None:
    with env_and_model(create_app(), lambda m, t: reply) as (env_url, model_url, _):
        status = await rollout(env_url, model_url, NUMERIC)
        assert status.status.ok and status.reward == 0.0
        assert reason in status.info["reason"]


async def test_agent_cannot_write_to_the_database() -> None:
    row = next(r for r in ROWS if isinstance(r["ground_truth"], int))
    writes = ["DELETE FROM orders", "DROP TABLE customers", "UPDATE products SET price = 0",
              "INSERT INTO customers VALUES (999, 'x', 'y', '2024-01-01')",
              "ATTACH DATABASE 'file:/tmp/openrft-evil.db' AS evil", "PRAGMA query_only = OFF",
              "CREATE TABLE t (x)"]

    def script(messages, tools):
        done = _tool_results(messages)
        if len(done) < len(writes):
            return {"tool_calls": [{"name": "run_query", "arguments": {"sql": writes[len(done)]}}]}
        if len(done) == len(writes):
            return {"tool_calls": [{"name": "run_query", "arguments": {"sql": "SELECT COUNT(*) FROM orders"}}]}
        return {"tool_calls": [{"name": "submit_answer", "arguments": {"answer": "0"}}]}

    with env_and_model(create_app(max_turns=12), script) as (env_url, model_url, _):
        status = await rollout(env_url, model_url, row)
    results = [m.content for m in status.messages if m.role == "tool"]
    assert all("not authorized" in r for r in results[: len(writes)]), results
    fresh = open_database(row["metadata"]["seed"])
    assert json.loads(results[len(writes)])["rows"][0][0] == run_select(fresh, "SELECT COUNT(*) FROM orders")[1][0][0]
    assert status.metrics["tool_errors"] == len(writes)


async def test_model_that_never_stops_calling_tools_is_cut_at_the_turn_limit() -> None:
    loop = {"tool_calls": [{"name": "list_tables", "arguments": {}}]}
    with env_and_model(create_app(max_turns=4), lambda m, t: loop) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, NUMERIC)
        assert status.termination_reason == "max_turns"
        assert len(model_app.state.requests) == 4
        assert status.reward == 0.0 and "never called" in status.info["reason"]
        assert await healthy(env_url)


def test_database_limits() -> None:
    db = open_database(5)
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        run_select(db, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT COUNT(*) FROM r",
                   time_s=0.2)
    columns, rows, cut = run_select(db, "SELECT * FROM orders")
    assert columns[0] == "id" and len(rows) == 50 and cut
    with pytest.raises(sqlite3.Error):
        run_select(db, "SELECT randomblob(1000000000)")
    # same seed, same shop
    assert run_select(open_database(5), "SELECT * FROM products")[1] == run_select(db, "SELECT * FROM products")[1]


def test_dataset_deterministic_and_split_by_database() -> None:
    train = generate("sql_tools", split="train", seed=1, n=40)
    assert train == generate("sql_tools", split="train", seed=1, n=40)
    test = generate("sql_tools", split="test", seed=1, n=40)
    assert not {r["metadata"]["seed"] for r in train} & {r["metadata"]["seed"] for r in test}
    for r in train[:10]:
        assert question(r["metadata"]["seed"], r["metadata"]["task_id"]).answer == r["ground_truth"]
    with pytest.raises(ValueError, match="not a sql_tools task id"):
        question(1, "drop_tables/1")
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in default_path("sql_tools", split).read_text().splitlines()]
        assert shipped == default_rows("sql_tools", split)


async def test_conformance_passes() -> None:
    await assert_conformant(create_app(), NUMERIC)


async def test_task_without_a_database_seed_fails_with_a_clear_status() -> None:
    row = {**NUMERIC, "metadata": {"task_id": NUMERIC["metadata"]["task_id"]}}
    with env_and_model(create_app(), lambda m, t: "hi") as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, row)
        assert not status.status.ok and "task_metadata.seed must be an integer" in status.status.message
        assert not model_app.state.requests
