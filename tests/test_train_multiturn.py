"""Multi-turn tool use through the trainer: an env built with env_sdk's `tool_agent` calls the
model, gets a parsed tool call, runs the tool, sends the tool result back, and calls again. The
model's tokens come from a scripted backend (the tiny model cannot be relied on to emit an exact
tool call) whose logprobs are the live model's own, so the update is a real one. The training
sample is one merged sequence in which the tool result and prompts are masked."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

import trainer.commands.train as run_module
from env_sdk import RolloutTask, create_env_app, tool_agent
from tests.helpers import serve_app
from trainer.generation import ScriptedBackend
from trainer.config import load_config
from trainer.commands.train import train

TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def correct(task: RolloutTask, messages: list[dict[str, Any]]) -> float:
    return 1.0 if "5" in (messages[-1].get("content") or "") else 0.0


def test_tool_call_turns_merge_and_mask_the_tool_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.models import build_tiny_model

    answers = itertools.cycle(["The answer is 5.", "It is 6."])  # groups get different rewards

    def make_backend(config: Any, learner: Any) -> ScriptedBackend:
        def script(prompt_ids: list[int], params: Any) -> str:
            prompt = learner.tokenizer.decode(prompt_ids)
            return next(answers) if "<tool_response>" in prompt else TOOL_CALL

        return ScriptedBackend(learner.tokenizer, script, model=learner.model)

    captured: list[Any] = []
    real_build_batch = run_module.build_batch

    def spy(groups: Any, config: Any) -> Any:
        batch = real_build_batch(groups, config)
        captured.append((groups, batch))
        return batch

    monkeypatch.setattr(run_module, "make_backend", make_backend)
    monkeypatch.setattr(run_module, "build_batch", spy)

    model = build_tiny_model(tmp_path / "model")
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 3?"}]}) + "\n")
    app = create_env_app(tool_agent([add], evaluator=correct, max_turns=4))
    with serve_app(app) as url:
        config = load_config(None, [
            f"model={model}", f"dataset={dataset}", f"envs=[{{url: '{url}'}}]", f"run_dir={tmp_path / 'run'}",
            "steps=2", "tasks_per_step=1", "group_size=4", "sampling.max_tokens=64", "lora.rank=4",
            "progress=false",
        ])
        run_dir = train(config)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    for groups, batch in captured:
        rollouts = groups[0].rollouts
        assert all(r.ok for r in rollouts) and sorted(r.reward for r in rollouts) == [0.0, 0.0, 1.0, 1.0]
        for r in rollouts:
            first, second = r.calls
            assert first.response["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
            tool_message = second.messages[-1]
            assert tool_message["role"] == "tool" and tool_message["content"] == "5"
            assert tool_message["tool_call_id"] == first.response["tool_calls"][0]["id"]
            assert not r.prefix_mismatch
            # the env's final conversation: user, assistant tool call, tool result, assistant answer
            assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant"]
        assert len(batch.samples) == 4  # one merged sequence per rollout
        for s in batch.samples:
            [r] = [r for r in rollouts if r.rollout_id == s.rollout_id]
            first, second = r.calls
            assert s.input_ids == second.prompt_ids + second.completion_ids
            sampled = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
            assert sampled == first.completion_ids + second.completion_ids
            between = s.input_ids[len(first.prompt_ids) + len(first.completion_ids): len(second.prompt_ids)]
            assert all(m == 0 for m in s.loss_mask[len(first.prompt_ids) + len(first.completion_ids): len(second.prompt_ids)])
            assert "<tool_response>\n5\n</tool_response>" in tok.decode(between)
            assert "tool_response" not in tok.decode(sampled)
            # logprobs recorded for exactly the sampled tokens
            assert [lp != 0.0 for lp, m in zip(s.old_logprobs, s.loss_mask) if m] == [True] * len(sampled)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["groups/trained"] == 1 and math.isfinite(m["loss"]) for m in metrics)
    assert all(abs(m["logprob_abs_diff"]) < 1e-4 for m in metrics)  # the learner recomputes the same logprobs
    dumped = json.loads((run_dir / "rollouts" / "step_000001.jsonl").read_text().splitlines()[0])
    assert dumped["messages"][2]["role"] == "tool" and dumped["num_calls"] == 2
