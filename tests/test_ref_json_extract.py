"""reference_envs.json_extract over real HTTP: env server + scripted OpenAI-compatible model."""

from __future__ import annotations

import json

import pytest

from reference_envs.datasets import default_path, default_rows, generate
from reference_envs.json_extract.dataset import task
from reference_envs.json_extract.evaluator import evaluate
from reference_envs.json_extract.server import create_app
from tests.ref_envs_util import assert_conformant, env_and_model, healthy, rollout

ROW = generate("json_extract", split="test", seed=2, n=1, kind="order")[0]
FIELDS = ROW["ground_truth"]["fields"]


def _fenced(obj: dict) -> str:
    return "Here you go:\n```json\n" + json.dumps(obj) + "\n```"


@pytest.mark.parametrize(
    ("reply", "reward", "reason"),
    [
        (_fenced(FIELDS), 1.0, "all fields correct"),
        # formatting differences that are still right
        (json.dumps({**FIELDS, "item": FIELDS["item"].upper() + "."}), 1.0, "all fields correct"),
        # valid JSON, two of five fields wrong -> partial credit
        (json.dumps({**FIELDS, "quantity": FIELDS["quantity"] + 1, "express_shipping": not FIELDS["express_shipping"]}),
         0.6, "wrong: quantity="),
        # every field wrong but schema-valid -> 0
        (json.dumps({"order_id": "ORD-00000", "item": "nothing", "quantity": 99, "total_usd": 0.5,
                     "express_shipping": not FIELDS["express_shipping"]}), 0.0, "wrong:"),
        # schema violation gates everything to 0, even with correct values
        (json.dumps({**FIELDS, "quantity": str(FIELDS["quantity"])}), 0.0, "at $.quantity"),
        (json.dumps({**FIELDS, "note": "extra"}), 0.0, "Additional properties"),
        ("The order id is ORD-12345.", 0.0, "no JSON object"),
        ('{"order_id": "ORD-1', 0.0, "no JSON object"),
    ],
    ids=["correct", "formatting", "partial", "all-wrong", "schema-type", "schema-extra", "no-json", "truncated"],
)
async def test_rollout_scores(reply, reward, reason) -> None:
    with env_and_model(create_app(), lambda m, t: reply) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
        assert status.status.ok, status.status
        assert status.reward == pytest.approx(reward)
        assert reason in status.info["reason"]
        assert status.metrics["schema_valid"] == (0.0 if "no JSON" in reason or "$" in reason or "Additional" in reason
                                                  else 1.0)
        assert model_app.state.requests[0]["body"]["messages"] == ROW["messages"]
        assert evaluate(status.messages, ROW["ground_truth"]).score == pytest.approx(reward)


async def test_model_that_keeps_calling_tools_is_cut_at_the_turn_limit() -> None:
    call = {"tool_calls": [{"name": "lookup", "arguments": {"q": "order"}}]}
    with env_and_model(create_app(max_turns=2), lambda m, t: call) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
        assert status.termination_reason == "max_turns" and len(model_app.state.requests) == 2
        assert status.reward == 0.0 and "no answer" in status.info["reason"]
        assert await healthy(env_url)


def test_tasks_rebuild_from_ids_and_every_kind_is_consistent() -> None:
    rows = generate("json_extract", split="train", seed=4, n=60)
    assert rows == generate("json_extract", split="train", seed=4, n=60)
    assert {r["metadata"]["kind"] for r in rows} == {"contact", "order", "event"}
    test_texts = {r["messages"][0]["content"] for r in generate("json_extract", split="test", seed=4, n=60)}
    assert not test_texts & {r["messages"][0]["content"] for r in rows}
    for r in rows:
        t = task(r["metadata"]["task_id"])
        assert t.fields == r["ground_truth"]["fields"]
        # the expected answer is itself schema-valid and scores 1
        assert evaluate([{"role": "assistant", "content": json.dumps(t.fields)}], r["ground_truth"]).score == 1.0
    with pytest.raises(ValueError, match="ground_truth must be"):
        evaluate([], {"fields": {}})
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in default_path("json_extract", split).read_text().splitlines()]
        assert shipped == default_rows("json_extract", split)


async def test_conformance_passes() -> None:
    await assert_conformant(create_app(), ROW)
