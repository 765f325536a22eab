"""`openrft eval` against the calculator env (a real server on loopback, real HTTP) reports the
multi-turn figures: tool calls per rollout, the calls the parser could not read (by reason), turns
per episode and termination reasons. The model's text comes from a scripted backend (the tiny
model cannot be relied on to write tool calls) that writes a canonical call, then a small model's
single-quoted unclosed call, then an unreadable block next to the right answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from reference_envs.calculator.server import create_app
from reference_envs.datasets import generate, write_jsonl
from tests.helpers import serve_app
from trainer import generation
from trainer.commands.evaluate import evaluate
from trainer.config import load_config
from trainer.generation import ScriptedBackend


def calculator_script(tokenizer: Any) -> Any:
    def script(prompt_ids: list[int], params: Any) -> str:
        prompt = tokenizer.decode(prompt_ids)
        a, b, c = map(int, re.findall(r"What is (\d+) \* (\d+) \* (\d+)\?", prompt)[-1])
        done = prompt.count("<tool_response>")
        if done == 0:
            return f'<tool_call>\n{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'
        if done == 1:
            return f"<tool_call>\n{{'name': 'multiply', 'arguments': {{'a': {a * b}, 'b': {c}}}}}\n"
        return f"<tool_call>{{oops}}</tool_call> The answer is {a * b * c}."

    return script


def test_eval_reports_tool_use_turns_and_terminations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.models import build_tiny_model

    def scripted(kind: str, model_dir: Any, model: Any, tokenizer: Any, **kwargs: Any) -> ScriptedBackend:
        return ScriptedBackend(tokenizer, calculator_script(tokenizer))

    monkeypatch.setattr(generation, "create_backend", scripted)
    model = build_tiny_model(tmp_path / "model")
    dataset = tmp_path / "tasks.jsonl"
    write_jsonl(generate("calculator", split="test", seed=0, n=3), dataset)
    with serve_app(create_app()) as url:
        config = load_config(None, [f"model={model}", f"dataset={dataset}", f"envs=[{{url: '{url}'}}]",
                                    "eval.samples=2", f"run_dir={tmp_path / 'run'}", "progress=false"])
        result = evaluate(config)
    ep = result.episodes
    assert result.mean_reward == 1.0 and result.finished == 6
    assert ep["tools/calls_per_rollout"] == 2.0 and ep["tools/call_rate"] == 1.0
    assert ep["tools/invalid_calls"] == 6.0 and ep["tools/invalid/not_json"] == 6.0
    assert ep["tools/validity"] == pytest.approx(12 / 18)
    assert ep["episode/turns"] == 3.0 and ep["termination/stop"] == 6.0
    # the single-quoted call re-renders canonically, so the next prompt does not extend the sampled tokens
    assert ep["prefix_mismatch"] == 6.0
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert written["episodes"]["tools/invalid_calls"] == 6.0
