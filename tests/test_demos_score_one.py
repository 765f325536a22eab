"""`openrft dataset NAME --demos`: demonstrations from the env's own solver, played by the env's own
agent, score 1 with the env's grader, come from train tasks that are neither RFT tasks (the shipped
train file) nor test tasks, and render for `openrft sft` as the gateway renders them."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference_envs.datasets import default_path
from reference_envs.demos import _task_key, demo_rows


@pytest.mark.parametrize("name", ["calculator", "sql_tools", "json_extract", "math"])
def test_demos_score_one_and_avoid_rft_and_test_tasks(name: str) -> None:
    rows = demo_rows(name, n=12, seed=3)
    evaluate = importlib.import_module(f"reference_envs.{name}.evaluator").evaluate
    assert len(rows) == 12
    for row in rows:
        assert evaluate(row["messages"], row["ground_truth"]).score == 1.0
        assert row["metadata"]["split"] == "train"
    shipped = {_task_key(json.loads(line)) for split in ("train", "test")
               for line in default_path(name, split).read_text().splitlines()}
    assert not shipped & {_task_key(r) for r in rows}
    if name in ("calculator", "sql_tools"):  # tool envs: the demos call tools and carry the env's tool specs
        assert rows[0]["tools"] and sum(bool(m.get("tool_calls")) for m in rows[0]["messages"]) >= 2
    assert demo_rows(name, n=12, seed=3) == rows  # deterministic from the seed


def test_calculator_demos_need_two_tool_calls_and_render_for_sft(tmp_path: Path) -> None:
    out = tmp_path / "demos.jsonl"
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "dataset", "calculator", "--demos", "--n", "6",
                           "--seed", "5", "--out", str(out)], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        names = [c["function"]["name"] for m in row["messages"] for c in m.get("tool_calls") or []]
        assert len(names) >= 2 and set(names) == {"multiply"} and row["messages"][-1]["content"]
    from trainer.commands.sft import tokenize_dataset
    from trainer.models import build_tiny_model
    from trainer.models.loading import load_tokenizer
    from trainer.sft_config import SftConfig

    model = build_tiny_model(tmp_path / "tiny")
    examples = tokenize_dataset(SftConfig(model=str(model), dataset=str(out)), load_tokenizer(model))
    assert len(examples) == 6 and all(sum(e.loss_mask) > 20 for e in examples)
