"""Pipelined steps (`async.max_staleness`) and dynamic sampling (`rollout.dynamic_sampling`), end to end:
the tiny model, a real env server on loopback, `openrft train` and `--resume`. Pinned: staleness stays
within its bound (and is really 1 where the pipeline ran ahead), every recorded call carries the policy
version that sampled it, the data order is the stream's, a checkpoint saves the cursor of trained groups
only (groups in flight are drawn again after --resume: none lost, none trained twice), and dynamic
sampling fills each step with groups that teach."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

import trainer.commands.train as run_module
from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import serve_app
from tests.test_train_e2e import dumped_task_indices, read_metrics, write_config
from trainer.commands.train import main
from trainer.data import TaskStream


async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    """Reward: the share of vowels in the reply; even-numbered tasks always score 1 (their groups tie)."""
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    tie = int(task.messages[-1]["content"].split()[-1]) % 2 == 0  # "Tell me about {i}" (write_dataset)
    reward = 1.0 if tie else sum(c in "aeiou" for c in text) / max(1, len(text))
    return AgentResult(reward=reward, messages=[*task.messages, {"role": "assistant", "content": text}])


@pytest.fixture(scope="module")
def env_url() -> Any:
    with serve_app(create_env_app(agent)) as url:
        yield url


def test_pipelined_steps_bound_staleness_and_resume_exactly(tmp_path: Path, tiny_model: Path, env_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[Any] = []
    real_build_batch = run_module.build_batch
    monkeypatch.setattr(run_module, "build_batch", lambda g, c: batches.append(real_build_batch(g, c)) or batches[-1])
    config_path = write_config(tmp_path, tiny_model, env_url, **{"async": {"max_staleness": 1}})
    assert main([str(config_path)]) == 0
    run_dir = tmp_path / "run"

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["staleness/max"] <= 1 and m["groups/stale"] == 0 for m in metrics)
    # step 2's groups were drawn at the start, by version 0, and trained from version 1
    assert metrics[1]["staleness/max"] == 1 and metrics[1]["staleness/mean"] > 0
    assert all(s.policy_version is not None for b in batches for s in b.samples)
    assert all(m["time/overlapped"] >= 0 and m["ratio/mean"] > 0 for m in metrics)
    # the checkpoint of step 2 holds the cursor of the 4 groups trained, though step 3's were in flight
    state = torch.load(run_dir / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["data"]["position"] == 4 and state["data"]["epoch"] == 0

    # stopped after step 3 without its checkpoint: resume from step 2, redo 3, go on to 4
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    assert main([str(config_path), "--set", "steps=4", "--resume"]) == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # the resumed sampler is version 2: step 3's groups are fresh, step 4's one update old
    assert metrics[2]["staleness/groups_max"] == 0 and metrics[3]["staleness/groups_max"] == 1
    stream = TaskStream(6, seed=7)
    expected = [stream.take(2) for _ in range(4)]
    for step in (1, 2, 3, 4):
        assert dumped_task_indices(run_dir / "rollouts" / f"step_{step:06d}.jsonl") == expected[step - 1]
    state = torch.load(run_dir / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert (state["data"]["epoch"], state["data"]["position"]) == (1, 2)


def test_dynamic_sampling_fills_each_step_with_groups_that_teach(tmp_path: Path, tiny_model: Path, env_url: str) -> None:
    config_path = write_config(tmp_path, tiny_model, env_url, steps=3,
                               rollout={"deadline_s": 60, "dynamic_sampling": True, "max_draws": 6})
    assert main([str(config_path)]) == 0
    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir)
    # half the tasks tie: each step drew more than 2 groups to train 2
    assert all(m["groups/trained"] == 2 == m["sampling/kept"] for m in metrics)
    assert sum(m["groups/all_equal"] for m in metrics) > 0
    assert all(m["sampling/drawn"] == m["groups/trained"] + m["groups/all_equal"] + m["groups/dropped"]
               + m["groups/stale"] for m in metrics)
    # the groups the steps took are the stream's order (stale ones, drawn on too hopeful an estimate, left out)
    taken = [i for step in (1, 2, 3) for i in dumped_task_indices(run_dir / "rollouts" / f"step_{step:06d}.jsonl")]
    drawn = int(sum(m["sampling/drawn"] for m in metrics))
    order = TaskStream(6, seed=7).take(drawn)
    it = iter(order)
    assert all(any(i == j for j in it) for i in taken)  # a subsequence, in order
    state = torch.load(run_dir / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert state["data"]["epoch"] * 6 + state["data"]["position"] == drawn


def test_async_section_is_spelled_async_and_refuses_vllm(tmp_path: Path) -> None:
    from trainer.config import ConfigError, load_config, save_config

    base = ["model=m", "dataset=d", "envs=[{url: 'http://x'}]"]
    config = load_config(None, [*base, "async.max_staleness=2", "rollout.dynamic_sampling=true"])
    assert config.async_.max_staleness == 2 and config.rollout.dynamic_sampling
    save_config(config, tmp_path / "c.yaml")
    assert "async:\n  max_staleness: 2" in (tmp_path / "c.yaml").read_text()
    assert load_config(tmp_path / "c.yaml").async_.max_staleness == 2  # the saved config loads back
    with pytest.raises(ConfigError, match="async.max_staleness > 0 needs backend: transformers"):
        load_config(None, [*base, "async.max_staleness=1", "backend=vllm"])
    with pytest.raises(ConfigError, match="unknown config key 'async.depth'"):
        load_config(None, [*base, "async.depth=1"])
