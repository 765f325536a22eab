"""The tiny local model: builds offline, loads with the Auto classes, is seed-determined, and
its ChatML template renders tools, tool calls and tool results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.commands.model import main
from trainer.models import IM_END, build_tiny_model, load_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def test_loads_with_auto_classes(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert model.config.model_type == "qwen2"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert tokenizer.eos_token == IM_END and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>"):
        assert len(tokenizer.encode(token)) == 1, token
    out = model(torch.tensor([tokenizer.encode("hello world")]))
    assert out.logits.shape[-1] == len(tokenizer)


def test_tokenizer_round_trips_bytes(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    for text in ["What is 123 + 456? 579.", '{"name": "add", "arguments": {"a": 1}}', "héllo 世界 🙂\n\n\tx  y"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    # digits are single tokens (Qwen2 split), which helps a tiny model with arithmetic
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_same_seed_same_files_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_chat_template_renders_tools_calls_and_results(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(TOOLS[0]) in system
    assert rest == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False, tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_cli_and_load_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    model, tokenizer = load_model(tmp_path / "m")
    assert model.dtype == torch.float32 and tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path / "missing")
