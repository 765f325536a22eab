"""`init_adapter`: RFT (`openrft train`) starts from an `openrft sft` adapter's LoRA weights, and
trains on from there; a LoRA shape that does not match the config is a clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from env_sdk import create_env_app
from tests.helpers import serve_app
from tests.test_train_e2e import vowel_agent, write_config
from trainer.commands.sft import sft
from trainer.commands.train import main
from trainer.learning.learner import Learner
from trainer.sft_config import SftConfig


@pytest.fixture(scope="module")
def sft_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {i}"},
                          {"role": "assistant", "content": "aeiou aeiou"}]} for i in range(4)]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SftConfig(model=str(tiny_model), dataset=str(tmp / "d.jsonl"), epochs=2, batch_size=2,
                       lora={"rank": 4, "alpha": 8}, optim={"lr": 1e-2}, run_dir=str(tmp / "run"), progress=False)
    return sft(config) / "adapter"


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_rft_starts_from_the_sft_adapter(tiny_model: Path, sft_adapter: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, torch.Tensor]] = []
    original = Learner.train_step

    def spy(self: Learner, samples: list[Any], lr: float | None = None) -> dict[str, float]:
        seen.append(lora_state(self.model))  # the weights the step starts from
        return original(self, samples, lr=lr)

    monkeypatch.setattr(Learner, "train_step", spy)
    with serve_app(create_env_app(vowel_agent)) as url:
        config = write_config(tmp_path, tiny_model, url, steps=2, init_adapter=str(sft_adapter))
        assert main([str(config)]) == 0
    saved = load_file(str(sft_adapter / "adapter_model.safetensors"))
    assert saved and set(seen[0]) == set(saved)
    assert all(torch.equal(seen[0][k], saved[k]) for k in saved)  # step 1 starts from the SFT weights
    after = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # and RFT moved them on


def test_an_adapter_of_another_shape_is_a_clear_error(tiny_model: Path, sft_adapter: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with serve_app(create_env_app(vowel_agent)) as url:
        config = write_config(tmp_path, tiny_model, url, init_adapter=str(sft_adapter), lora={"rank": 8, "alpha": 8})
        assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "init_adapter" in err and "lora.rank: adapter 4, config 8" in err
