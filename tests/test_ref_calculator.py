"""reference_envs.calculator over real HTTP: a scripted model multiplies with the real tool, twice,
then answers; the env scores the episode from the task id."""

from __future__ import annotations

import json

from reference_envs.calculator.dataset import problem
from reference_envs.calculator.evaluator import evaluate
from reference_envs.calculator.server import create_app
from reference_envs.datasets import default_path, default_rows, generate
from tests.ref_envs_util import assert_conformant, env_and_model, rollout

ROW = generate("calculator", split="test", seed=4, n=1)[0]


def solver(row: dict, *, answer_offset: int = 0):
    a, b, c = problem(row["metadata"]["task_id"]).numbers

    def script(messages, tools):
        done = [m["content"] for m in messages if m["role"] == "tool"]
        if not done:
            return {"tool_calls": [{"name": "multiply", "arguments": {"a": a, "b": b}}]}
        if len(done) == 1:
            return {"tool_calls": [{"name": "multiply", "arguments": {"a": int(done[0]), "b": c}}]}
        return f"The answer is {int(done[1]) + answer_offset}."

    return script


async def test_two_multiplications_then_the_answer_scores_1() -> None:
    with env_and_model(create_app(), solver(ROW)) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
    assert status.status.ok and status.reward == 1.0, status.info
    assert status.termination_reason == "stop" and status.metrics["tool_calls"] == 2.0
    assert [t["function"]["name"] for t in model_app.state.requests[0]["body"]["tools"]] == ["multiply"]
    assert evaluate(status.messages, ROW["ground_truth"]).score == 1.0


async def test_a_wrong_answer_scores_0() -> None:
    with env_and_model(create_app(), solver(ROW, answer_offset=1)) as (env_url, model_url, _):
        status = await rollout(env_url, model_url, ROW)
    assert status.status.ok and status.reward == 0.0


def test_dataset_deterministic_split_and_shipped() -> None:
    train = generate("calculator", split="train", seed=1, n=60)
    assert train == generate("calculator", split="train", seed=1, n=60)
    test = generate("calculator", split="test", seed=1, n=30)
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    assert all(r["ground_truth"] >= 12**3 for r in train)
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in default_path("calculator", split).read_text().splitlines()]
        assert shipped == default_rows("calculator", split)


async def test_conformance_passes() -> None:
    await assert_conformant(create_app(), ROW)
