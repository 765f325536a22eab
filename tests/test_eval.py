"""`openrft eval`: mean reward and pass@k of the base model, base + adapter, and an external
OpenAI-compatible URL, against a real env server on loopback; no training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import scripted_model_app, serve_app
from trainer.commands.evaluate import main, pass_at_k


async def vowel_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)),
                       messages=list(task.messages) + [{"role": "assistant", "content": text}])


def test_pass_at_k() -> None:
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from trainer.models import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    model = build_tiny_model(root / "model")
    dataset = root / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Word {i}?"}]}) + "\n"
                               for i in range(3)))
    with serve_app(create_env_app(vowel_agent)) as env_url:
        config = root / "eval.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(model), "dataset": str(dataset), "envs": [{"url": env_url}], "run_dir": str(root / "run"),
            "sampling": {"max_tokens": 8, "temperature": 0.0}, "progress": False,
            "eval": {"samples": 2, "k": [1, 2]},
        }))
        yield root, model, config


def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rollouts = path.with_name(path.stem + "_rollouts.jsonl").read_text().splitlines()
    return json.loads(path.read_text()), [json.loads(line) for line in rollouts]


def test_base_and_adapter(setup: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.config import GrpoConfig, LoraConfig, OptimConfig
    from trainer.learning.learner import Learner

    root, model, config = setup
    assert main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "mean reward" in out and "pass@2" in out
    base, base_rollouts = read(root / "run" / "eval.json")
    assert base["tasks"] == 3 and base["samples"] == 2 and set(base["pass_at_k"]) == {"pass@1", "pass@2"}
    assert 0.0 <= base["mean_reward"] <= 1.0 and base["failures"] == {}
    assert len(base_rollouts) == 6 and all(r["status"]["code"] == 100 for r in base_rollouts)

    # an adapter that changes the model's greedy replies
    learner = Learner(model, lora=LoraConfig(rank=4, target_modules=["lm_head"]), optim=OptimConfig(),
                      grpo=GrpoConfig(), max_tokens=8, device="cpu", dtype="float32")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    learner.save_adapter(root / "adapter")
    assert main([str(config), "--adapter", str(root / "adapter"), "--out", str(root / "adapted.json")]) == 0
    adapted, adapted_rollouts = read(root / "adapted.json")
    assert adapted["model"].endswith(str(root / "adapter"))
    replies = lambda rows: [r["messages"][-1]["content"] for r in rows]  # noqa: E731
    assert replies(adapted_rollouts) != replies(base_rollouts)
    capsys.readouterr()

    assert main([str(config), "--adapter", str(root / "nope")]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_external_url_is_called_directly(setup: Any, capsys: pytest.CaptureFixture[str]) -> None:
    root, _, config = setup
    external = scripted_model_app(lambda messages, tools: "aeiou")
    with serve_app(external) as url:
        assert main([str(config), "--url", f"{url}/v1", "--set", "eval.api_key=sk-ext", "eval.samples=3",
                     "eval.k=[1, 3]", f"eval.out={root / 'ext.json'}"]) == 0
    result, rollouts = read(root / "ext.json")
    assert result["mean_reward"] == 1.0 and result["pass_at_k"] == {"pass@1": 1.0, "pass@3": 1.0}
    assert len(external.state.requests) == 9  # 3 tasks x 3 samples, straight from the envs
    assert all(r["auth"] == "Bearer sk-ext" and r["path"] == "v1/chat/completions" for r in external.state.requests)
    assert all(r["num_calls"] == 0 for r in rollouts)  # nothing recorded: no gateway in between
