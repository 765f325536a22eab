"""TrainConfig: file + --set overrides, type checking, unknown keys named, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, TrainConfig, load_config, save_config

BASE = {"model": "m", "dataset": "d.jsonl", "envs": [{"url": "http://127.0.0.1:1"}]}


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_every_knob(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    # the knobs a user looks for are all there
    for dotted in [
        "model", "dataset", "envs", "evaluator", "steps", "tasks_per_step", "group_size",
        "sampling.temperature", "sampling.top_p", "sampling.max_tokens",
        "lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules",
        "optim.lr", "optim.weight_decay", "optim.max_grad_norm",
        "grpo.clip_eps_low", "grpo.clip_eps_high", "grpo.kl_coef", "grpo.scale_rewards",
        "grpo.micro_batch_size", "grpo.loss_agg",
        "rollout.deadline_s", "rollout.max_retries", "rollout.min_group_size", "rollout.max_in_flight",
        "checkpoint_every", "seed", "device", "dtype", "run_dir", "gateway.host", "gateway.port", "backend",
    ]:
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
    assert cfg.envs[0].token is None and cfg.backend == "transformers"


def test_set_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE),
        ["grpo.kl_coef=0.05", "sampling.max_tokens=16", "grpo.scale_rewards=none", "lora.target_modules=[q_proj, v_proj]",
         "envs=[{url: 'http://a', token: t}]"],
    )
    assert cfg.grpo.kl_coef == 0.05 and cfg.sampling.max_tokens == 16 and cfg.grpo.scale_rewards == "none"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.envs[0].url == "http://a" and cfg.envs[0].token == "t"


def test_json_config(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"model": "m", "dataset": "d", "envs": [{"url": "http://x"}], "steps": 3}')
    assert load_config(path).steps == 3


@pytest.mark.parametrize(
    ("data", "overrides", "needle"),
    [
        ({**BASE, "grpo": {"clip_eps": 0.2}}, [], "unknown config key 'grpo.clip_eps'"),
        ({**BASE, "stpes": 3}, [], "unknown config key 'stpes'"),
        (BASE, ["grpo.bogus=1"], "unknown config key 'grpo.bogus'"),
        (BASE, ["optimizer.lr=1"], "unknown config key 'optimizer'"),
        (BASE, ["steps=many"], "steps"),
        (BASE, ["grpo.scale_rewards=mean"], "grpo.scale_rewards"),
        (BASE, ["sampling.top_p=0"], "sampling.top_p"),
        ({"model": "m", "envs": [{"url": "u"}]}, [], "missing required config key 'dataset'"),
        (BASE, ["rollout.min_group_size=9"], "min_group_size"),
        (BASE, ["steps"], "key=value"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, data: dict, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), overrides)
    assert needle in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), ["steps=7", "grpo.kl_coef=0.1"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert isinstance(again, TrainConfig)
