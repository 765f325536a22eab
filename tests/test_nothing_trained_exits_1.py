"""A run that trained nothing is never handed back as a result: `openrft train` (as a subprocess)
exits 1 with the failures counted by kind, the env named and what to check next, and writes no
adapter; a streak of `rollout.max_untrained_steps` such steps stops the run early; `openrft eval`
exits 1 when every rollout failed and says what to change when most ended at the deadline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import serve_app

ROOT = Path(__file__).resolve().parents[1]


async def crashing_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    raise RuntimeError("tool backend down")


async def constant_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    return AgentResult(reward=0.0, messages=[*task.messages, reply.choices[0].message.model_dump(exclude_none=True)])


async def slow_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    await asyncio.sleep(30)
    return AgentResult(reward=1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def envs() -> Iterator[dict[str, str]]:
    with serve_app(create_env_app(crashing_agent)) as crash, serve_app(create_env_app(constant_agent)) as const, \
            serve_app(create_env_app(slow_agent)) as slow:
        yield {"crash": crash, "constant": const, "slow": slow}


def write_config(tmp_path: Path, model: Path, env_url: str, **overrides: Any) -> Path:
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n"
                               for i in range(4)))
    config = {"model": str(model), "dataset": str(dataset), "envs": [{"url": env_url}], "steps": 2,
              "tasks_per_step": 2, "group_size": 2, "sampling": {"max_tokens": 4}, "lora": {"rank": 2, "alpha": 4},
              "rollout": {"deadline_s": 30, "max_retries": 0}, "eval": {"samples": 2, "limit": 2},
              "run_dir": str(tmp_path / "run"), "progress": False, **overrides}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def openrft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_a_run_whose_rollouts_all_failed_exits_1(tmp_path: Path, tiny_model: Path, envs: dict[str, str]) -> None:
    config = write_config(tmp_path, tiny_model, envs["crash"])
    proc = openrft("train", str(config))
    assert proc.returncode == 1, proc.stderr
    assert "no sample was trained in 2 step(s); 0 of 8 rollouts finished, 8 failed" in proc.stderr
    assert "failures by kind: internal 8" in proc.stderr
    assert envs["crash"] in proc.stderr and "RuntimeError: tool backend down" in proc.stderr
    assert "next: the env's agent raised" in proc.stderr
    assert "step 1 trained nothing: 4 of 4 rollouts failed (internal 4)" in proc.stderr  # said at each step
    assert not (tmp_path / "run" / "adapter").exists()  # nothing handed back as a result
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the steps are kept to read


def test_a_streak_of_tied_steps_stops_the_run(tmp_path: Path, tiny_model: Path, envs: dict[str, str]) -> None:
    config = write_config(tmp_path, tiny_model, envs["constant"], steps=6)
    proc = openrft("train", str(config), "--set", "rollout.max_untrained_steps=2")
    assert proc.returncode == 1, proc.stderr
    assert "steps 1-2: no sample was trained in 2 step(s); 8 of 8 rollouts finished" in proc.stderr
    assert "4 group(s) finished with all-equal rewards" in proc.stderr
    assert "2 group(s) had all-equal rewards (0)" in proc.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # stopped at step 2 of 6


def test_eval_where_every_rollout_failed_exits_1(tmp_path: Path, tiny_model: Path, envs: dict[str, str]) -> None:
    config = write_config(tmp_path, tiny_model, envs["slow"], rollout={"deadline_s": 1, "max_retries": 0})
    proc = openrft("eval", str(config))
    assert proc.returncode == 1, proc.stderr
    assert "every rollout failed (4)" in proc.stderr and "deadline_exceeded 4" in proc.stderr
    assert "4 of 4 rollouts ended at the deadline (rollout.deadline_s = 1): raise rollout.deadline_s" in proc.stderr
    result = json.loads((tmp_path / "run" / "eval.json").read_text())  # the result is still written
    assert result["finished"] == 0 and result["failures"] == {"deadline_exceeded": 4}
