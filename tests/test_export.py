"""`openrft export`: the adapter copy with its README, and the merged model, on the tiny model
with a real (random, non-zero) LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.models.export import main
from trainer.models import build_tiny_model

IDS = torch.tensor([[1, 5, 9, 14, 3, 7]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """(model dir, adapter dir, base logits, adapter logits) on a fixed input."""
    root = tmp_path_factory.mktemp("export")
    model_dir = build_tiny_model(root / "model")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        base_logits = base(IDS).logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():
        adapted_logits = peft_model(IDS).logits
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-4)  # the adapter does something
    peft_model.save_pretrained(root / "adapter")
    return model_dir, root / "adapter", base_logits, adapted_logits



def test_adapter_export_is_standard_peft_with_a_vllm_readme(trained, tmp_path: Path) -> None:
    model_dir, adapter_dir, _, adapted_logits = trained
    out = tmp_path / "sums-lora"
    assert main(["--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    readme = (out / "README.md").read_text()
    assert f"--enable-lora --lora-modules sums-lora={out.resolve()}" in readme
    assert "--max-lora-rank 8" in readme  # rank 4 rounds up to vLLM's smallest allowed value
    assert "PeftModel.from_pretrained" in readme and f"openrft serve --model {model_dir.resolve()}" in readme

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, adapted_logits, atol=1e-5)


def test_merged_export_loads_without_peft(trained, tmp_path: Path) -> None:
    model_dir, adapter_dir, base_logits, adapted_logits = trained
    out = tmp_path / "merged"
    assert main(["--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists()
    assert "lora" not in json.dumps(json.loads((out / "config.json").read_text())).lower()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = merged(IDS).logits
    assert torch.allclose(logits, adapted_logits, atol=1e-4)
    assert not torch.allclose(logits, base_logits, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_bad_inputs_name_the_problem(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, adapter_dir, _, _ = trained
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a PEFT adapter directory (no adapter_config.json)" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--adapter", str(adapter_dir), "--out", str(tmp_path / "o"), "--merge"]) == 2
    assert "not a transformers model directory" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
