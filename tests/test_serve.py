"""`openrft serve`: the official openai client gets completions from a base model with a
trained-style LoRA adapter applied, and parsed tool calls when the model emits one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import AsyncOpenAI
from peft import LoraConfig, get_peft_model

from tests.helpers import free_port, serve_app
from trainer.generation import ScriptedBackend, TransformersBackend
from trainer.types import SamplingParams
from trainer.gateway.chat import hermes_tool_call_text
from trainer.models import build_tiny_model, load_model
from trainer.commands.serve import create_app, main
from trainer.models import load_policy

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
HI = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter directory like RUN_DIR/adapter, with weights far from the identity."""
    model, _ = load_model(tiny)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    out = tmp_path_factory.mktemp("run") / "adapter"
    peft_model.save_pretrained(out)
    return out


async def _greedy_reply(model_dir: Path, adapter_dir: Path | None) -> str:
    model, tokenizer = load_policy(model_dir, adapter_dir)
    backend = TransformersBackend(model, tokenizer)
    with serve_app(create_app(backend, tokenizer, model_name="m")) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == ["m"]
        reply = await client.chat.completions.create(model="m", messages=HI, max_tokens=12, temperature=0)
    backend.close()
    assert reply.choices[0].finish_reason in {"stop", "length"} and reply.usage is not None
    return reply.choices[0].message.content or ""


async def test_completion_with_the_adapter_applied(tiny: Path, adapter: Path) -> None:
    with_adapter = await _greedy_reply(tiny, adapter)
    base = await _greedy_reply(tiny, None)
    assert with_adapter != base
    # the served text is what the adapter model generates
    from peft import PeftModel

    model, tokenizer = load_model(tiny)
    unmerged = PeftModel.from_pretrained(model, adapter)
    prompt = tokenizer.apply_chat_template(HI, add_generation_prompt=True, return_dict=False)
    backend = TransformersBackend(unmerged, tokenizer)
    direct = await backend.generate(prompt, SamplingParams(max_tokens=12, temperature=0))
    backend.close()
    assert tokenizer.decode(direct.token_ids, skip_special_tokens=True) == with_adapter


async def test_tool_call_is_parsed_and_api_key_enforced(tiny: Path) -> None:
    _, tokenizer = load_model(tiny)

    def script(prompt_ids: list[int], params: SamplingParams) -> str:
        prompt = tokenizer.decode(prompt_ids)
        if "get_weather" in prompt:  # tools were rendered into the prompt
            return "Checking.\n" + hermes_tool_call_text("get_weather", json.dumps({"city": "Paris"}))
        return "No tools."

    app = create_app(ScriptedBackend(tokenizer, script), tokenizer, api_key="sk-test")
    with serve_app(app) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        reply = await client.chat.completions.create(model="policy", messages=HI, tools=TOOLS)  # type: ignore[arg-type]
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        plain = await client.chat.completions.create(model="policy", messages=HI)
        assert plain.choices[0].message.content == "No tools." and plain.choices[0].message.tool_calls is None
        with pytest.raises(openai.AuthenticationError):
            await AsyncOpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).chat.completions.create(model="policy", messages=HI)
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            await client.chat.completions.create(model="policy", messages=HI, tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]


def test_cli_serves_over_http(tiny: Path, adapter: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "trainer.cli", "serve", "--model", str(tiny), "--adapter", str(adapter), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "openrft serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="run", messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert reply.usage is not None and reply.usage.completion_tokens <= 5 and reply.model == adapter.parent.name
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_bad_adapter_is_a_clear_error(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny), "--adapter", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
