"""`openrft train` end to end over real HTTP: an env_sdk server on loopback (uvicorn), the trainer
with the tiny model and its in-process gateway, 3 steps, then `--resume`; and the bad inputs a user
hits first (malformed dataset, unknown config key, unreachable env)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

import trainer.commands.train as run_module
from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import free_port, serve_app
from trainer.data import TaskStream
from trainer.commands.train import main

SEEN: dict[str, dict[str, Any]] = {}  # rollout_id -> what the env sent and got back


async def vowel_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    """One model call; reward = fraction of vowels in the reply (continuous: groups rarely tie)."""
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    SEEN[task.metadata.rollout_id] = {"messages": list(task.messages), "reply": text, "params": task.completion_kwargs()}
    messages = list(task.messages) + [{"role": "assistant", "content": text}]
    return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)), messages=messages,
                       termination_reason="stop")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def env_url() -> Any:
    with serve_app(create_env_app(vowel_agent)) as url:
        yield url


def write_dataset(path: Path, n: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {i}"}], "ground_truth": i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, tiny_model: Path, env_url: str, **overrides: Any) -> Path:
    config = {
        "model": str(tiny_model),
        "dataset": str(write_dataset(tmp_path / "tasks.jsonl", 6)),
        "envs": [{"url": env_url}],
        "steps": 3,
        "tasks_per_step": 2,
        "group_size": 4,
        "sampling": {"max_tokens": 12},
        "lora": {"rank": 4, "alpha": 8},
        "optim": {"lr": 1e-2},
        "grpo": {"micro_batch_size": 4},
        "rollout": {"deadline_s": 60},
        "checkpoint_every": 2,
        "seed": 7,
        "run_dir": str(tmp_path / "run"),
        "progress": False,
        **overrides,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def dumped_task_indices(dump: Path) -> list[int]:
    """The dataset index of each group of a rollouts dump, in group order."""
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    return [index for _, index in sorted({(r["group"], r["task_index"]) for r in rows})]


def test_three_steps_then_resume(tmp_path: Path, tiny_model: Path, env_url: str,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from trainer.models import load_model

    captured: list[Any] = []
    real_build_batch = run_module.build_batch

    def spy(groups: Any, config: Any) -> Any:
        batch = real_build_batch(groups, config)
        captured.append((groups, batch))
        return batch

    monkeypatch.setattr(run_module, "build_batch", spy)
    config_path = write_config(tmp_path, tiny_model, env_url)
    assert main([str(config_path)]) == 0
    run_dir = tmp_path / "run"

    # rollouts completed, and the recorded tokens are exactly the conversation the env saw
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert len(captured) == 3
    for groups, batch in captured:
        rollouts = [r for g in groups for r in g.rollouts]
        assert len(rollouts) == 8 and all(r.ok for r in rollouts)
        for r in rollouts:
            seen = SEEN[r.rollout_id]
            [call] = r.calls
            assert call.prompt_ids == tok.apply_chat_template(seen["messages"], add_generation_prompt=True,
                                                             tokenize=True, return_dict=False)
            assert tok.decode(call.completion_ids, skip_special_tokens=True) == seen["reply"]
            assert len(call.logprobs) == len(call.completion_ids) and all(lp <= 0 for lp in call.logprobs)
            assert seen["params"]["max_tokens"] == 12 and seen["params"]["temperature"] == 1.0
        for s in batch.samples:  # training sequences = recorded prompt + completion, completion unmasked
            [r] = [r for r in rollouts if r.rollout_id == s.rollout_id]
            assert s.input_ids == r.calls[0].prompt_ids + r.calls[0].completion_ids
            assert s.num_loss_tokens == len(r.calls[0].completion_ids)

    # metrics: every agreed key, finite loss
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ["reward/mean", "reward/std", "pass_rate", "loss", "kl", "clip_frac", "tokens_per_s", "time/generate",
                "time/env", "time/learn", "time/step", "groups/dropped", "groups/all_equal", "peak_memory_mb"]:
        assert all(key in m and math.isfinite(m[key]) for m in metrics), key
    assert sum(m["groups/trained"] for m in metrics) > 0 and all(m["rollouts/failed"] == 0 for m in metrics)
    config_saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config_saved["steps"] == 3 and config_saved["grpo"]["clip_eps_low"] == 0.2  # resolved, defaults in

    # checkpoints at 2 and 3 (the last step); the adapter reloads with peft and was trained
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    base, _ = load_model(tiny_model)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=False)])
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, plain)

    # a run stopped after step 3 without its checkpoint: resume from step 2, redo 3, go on to 4
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    (run_dir / "rollouts" / "step_000003.jsonl").rename(run_dir / "lost_step3.jsonl")
    captured.clear()
    assert main([str(config_path), "--set", "steps=4", "--resume"]) == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # step 3 once, not twice
    stream = TaskStream(6, seed=7)
    expected = [stream.take(2) for _ in range(4)]
    for step in (1, 2, 3, 4):  # the data order went on where the checkpoint left it
        assert dumped_task_indices(run_dir / "rollouts" / f"step_{step:06d}.jsonl") == expected[step - 1]
    assert dumped_task_indices(run_dir / "lost_step3.jsonl") == expected[2]
    state = torch.load(run_dir / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and state["data"]["epoch"] == 1 and state["data"]["position"] == 2
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {4}  # the optimizer continued from step 2's state (2 + 2), not from scratch
    assert len(captured) == 2
    capsys.readouterr()

    # the same run_dir without --resume is refused rather than overwritten
    assert main([str(config_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_inputs_name_what_is_wrong(tmp_path: Path, tiny_model: Path, env_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    config_path = write_config(tmp_path, tiny_model, env_url)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n{oops\n")
    assert main([str(config_path), "--set", f"dataset={bad}"]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err

    assert main([str(config_path), "--set", "grpo.clip=0.1"]) == 2
    assert "unknown config key 'grpo.clip'" in capsys.readouterr().err

    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main([str(config_path), "--set", f"envs=[{{url: '{dead}'}}]"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 20
    assert "no env server answers GET /health" in err and dead in err
    assert "Traceback" not in err
