"""reference_envs.math over real HTTP: env server + scripted OpenAI-compatible model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from reference_envs.datasets import default_path, default_rows, generate
from reference_envs.datasets import main as dataset_main
from reference_envs.math.dataset import problem
from reference_envs.math.evaluator import evaluate
from reference_envs.math.server import create_app
from tests.helpers import free_port
from tests.ref_envs_util import (
    assert_conformant,
    env_and_model,
    healthy,
    last_user_text,
    rollout,
)

ROW = generate("math", split="test", seed=3, n=1, kind="sums")[0]


def _sum_of(messages, tools):
    a, b = map(int, re.findall(r"\d+", last_user_text(messages))[:2])
    return a, b


@pytest.mark.parametrize(
    ("reply", "reward", "reason"),
    [
        (lambda a, b: f"{a} + {b} = **{a + b}**.", 1.0, "=="),
        (lambda a, b: f"The answer is {a + b + 1}", 0.0, "!="),
        (lambda a, b: "I cannot do arithmetic.", 0.0, "no number"),
        (lambda a, b: "", 0.0, "no answer"),
    ],
    ids=["correct", "wrong", "malformed", "empty"],
)
async def test_rollout_scores(reply, reward, reason) -> None:
    with env_and_model(create_app(), lambda m, t: reply(*_sum_of(m, t))) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
        assert status.status.ok, status.status
        assert status.reward == reward
        assert reason in status.info["reason"]
        assert status.termination_reason == "stop"
        # the model got the row's prompt and no tools; the env never saw the ground truth
        body = model_app.state.requests[0]["body"]
        assert body["messages"] == ROW["messages"] and "tools" not in body
        # trainer-side evaluator agrees with the env
        assert evaluate(status.messages, ROW["ground_truth"]).score == reward


async def test_model_that_keeps_calling_tools_is_cut_at_the_turn_limit() -> None:
    tool_call = {"tool_calls": [{"name": "calculator", "arguments": {"expr": "1+1"}}]}
    with env_and_model(create_app(max_turns=3), lambda m, t: tool_call) as (env_url, model_url, model_app):
        status = await rollout(env_url, model_url, ROW)
        assert status.termination_reason == "max_turns"
        assert len(model_app.state.requests) == 3
        assert status.reward == 0.0 and "no answer" in status.info["reason"]
        tool_results = [m for m in status.messages if m.role == "tool"]
        assert "unknown tool 'calculator'" in tool_results[0].content
        assert await healthy(env_url)


async def test_without_task_id_the_env_leaves_scoring_to_the_trainer() -> None:
    row = {**ROW, "metadata": {}}
    with env_and_model(create_app(), lambda m, t: "42") as (env_url, model_url, _):
        status = await rollout(env_url, model_url, row)
        assert status.status.ok and status.reward is None


def test_dataset_is_deterministic_split_disjoint_and_self_consistent(tmp_path) -> None:
    a = generate("math", split="train", seed=7, n=300)
    assert a == generate("math", split="train", seed=7, n=300)
    assert a != generate("math", split="train", seed=8, n=300)
    test = generate("math", split="test", seed=7, n=300)
    questions = lambda rows: {r["messages"][0]["content"] for r in rows}
    assert not questions(a) & questions(test)
    assert {r["metadata"]["kind"] for r in a} == {"sums", "arithmetic", "word"}
    for r in a[:50]:
        assert problem(r["metadata"]["task_id"]).answer == r["ground_truth"]
    sums = generate("math", split="train", seed=0, n=50, kind="sums")
    assert all(re.fullmatch(r"What is \d\d \+ \d\d\? Answer with a number only\.", r["messages"][0]["content"])
               for r in sums)
    # the CLI writes the same rows
    out = tmp_path / "sums.jsonl"
    assert dataset_main(["math", "--out", str(out), "--seed", "0", "--n", "50", "--kind", "sums"]) == 0
    assert out.read_text().count("\n") == 50
    assert dataset_main(["math", "--out", str(tmp_path), "--kind", "nope"]) == 2

def test_shipped_default_splits_match_the_generator() -> None:
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in default_path("math", split).read_text().splitlines()]
        assert shipped == default_rows("math", split)


def test_evaluator_needs_ground_truth_and_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="ground_truth"):
        evaluate([{"role": "assistant", "content": "3"}], None)
    with pytest.raises(ValueError, match="not a math task id"):
        problem("algebra/12")


async def test_conformance_passes() -> None:
    await assert_conformant(create_app(), ROW)


def test_served_with_the_cli_and_checked_with_the_conformance_cli(tmp_path) -> None:
    """What the README tells a user to run: `openrft env serve ...:agent --token` + `openrft conformance`."""
    port = free_port()
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"messages": ROW["messages"], "task_metadata": ROW["metadata"]}))
    cli = [sys.executable, "-m", "trainer.cli"]
    server = subprocess.Popen([*cli, "env", "serve", "reference_envs.math.server:agent", "--port", str(port),
                               "--token", "s3cret", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "env server did not start"
            time.sleep(0.1)
        check = subprocess.run([*cli, "conformance", url, "--token", "s3cret", "--task", str(task_file)],
                               capture_output=True, text=True, timeout=120, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "FAIL" not in check.stdout and "PASS" in check.stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
