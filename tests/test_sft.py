"""`openrft sft` as a user runs it (a subprocess, the tiny model): the loss on the assistant tokens
falls, the adapter changes what the model says, and a bad row is an error naming its file:line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def conversation(a: int, b: int) -> dict:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": str(a + b)},
                         {"role": "assistant", "content": f"The answer is {a + b}."}], "tools": TOOLS}


def run_sft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.cli", "sft", *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def greedy(model_dir: Path, adapter: Path | None, messages: list[dict]) -> list[int]:
    from trainer.gateway.chat import render_prompt
    from trainer.models.loading import load_policy

    model, tokenizer = load_policy(model_dir, adapter)
    prompt = render_prompt(tokenizer, messages, TOOLS)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_sft_lowers_the_loss_and_changes_outputs(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(conversation(a, a + 3)) + "\n" for a in range(8)))
    run_dir = tmp_path / "sft"
    done = run_sft("--set", f"model={tiny_model}", f"dataset={data}", f"run_dir={run_dir}", "epochs=20",
                   "batch_size=4", "optim.lr=0.01", "lora.rank=8", "progress=false", "checkpoint_every=6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 40 and all(x["tokens"] > 0 for x in steps)
    final = lines[-1]["final/mean_nll"]
    assert final < steps[0]["loss"] - 0.6, (steps[0]["loss"], final)  # from ~6.9 (uniform over the vocabulary)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "checkpoints" / "step_000006" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    prompt = conversation(2, 5)["messages"][:1]
    assert greedy(tiny_model, None, prompt) != greedy(tiny_model, run_dir / "adapter", prompt)


def test_a_bad_row_is_an_error_naming_file_and_line(tiny_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.commands.sft import main

    data = tmp_path / "demos.jsonl"
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"},
                             {"role": "assistant", "content": "ok"}]}
    data.write_text(json.dumps(conversation(1, 2)) + "\n{not json\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
                    + "\n" + json.dumps(bad_role) + "\n")
    overrides = ["--set", f"model={tiny_model}", f"dataset={data}", f"run_dir={tmp_path / 'r'}"]
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: not valid JSON" in err and f"{data}:3: field 'messages': no assistant turn" in err
    data.write_text(json.dumps(conversation(1, 2)) + "\n" + json.dumps(bad_role) + "\n")
    assert main(overrides) == 2
    assert f"{data}:2: messages[1].role" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
