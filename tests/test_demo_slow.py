"""The demo path on the real model (slow tier: `pytest -m slow tests/test_demo_slow.py`, a few
minutes on 2 cores): SmolLM2 trains a few GRPO steps against the math env running as its own
process; the adapter changes the model's outputs, loads in peft, and `openrft serve` answers
the official openai client with it. The config errors at the end are fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port
from trainer.commands.demo import DEMO_CONFIG, main


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on an idle 2-core CPU; a shared one is slower
def test_demo_trains_smollm2_and_the_adapter_serves(tmp_path: Path) -> None:
    import httpx
    import openai
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import load_config
    from trainer.commands.demo import run_demo
    from trainer.models.smollm2 import convert_smollm2

    model_dir = convert_smollm2()
    config = load_config(DEMO_CONFIG, ["steps=3", "progress=false", "sampling.max_tokens=12"])
    run_dir = tmp_path / "run"
    summary = run_demo(config, run_dir, model_dir=model_dir, train_n=64, test_n=8)

    assert summary["steps"] == 3 and summary["held_out_tasks"] == 8
    assert 0.0 <= summary["held_out_before"] <= 1.0 and 0.0 <= summary["held_out_after"] <= 1.0
    assert 0 < summary["peak_rss_mb"] < 7900  # the TRL baseline's peak
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and sum(m["groups/trained"] for m in metrics) > 0
    assert (run_dir / "report.html").read_text().count("data:image/png;base64,") == 4
    assert json.loads((run_dir / "demo.json").read_text()) == summary

    # the adapter is standard PEFT and changes what the model computes
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 47 + 38? Answer with a number only."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        base_logits = base(**prompt).logits[0, -1]
        tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        tuned_logits = tuned(**prompt).logits[0, -1]
    assert (tuned_logits - base_logits).abs().max() > 1e-3

    # and `openrft serve` answers the official client with it
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "serve", "--model", str(model_dir), "--adapter",
         str(run_dir / "adapter"), "--port", str(port), "--max-tokens", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "openrft serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "What is 12 + 30? Answer with a number only."}],
            temperature=0, max_tokens=8,
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_bad_override_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--run-dir", str(tmp_path / "r"), "--set", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_existing_run_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["--run-dir", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
