"""GRPO step time with the vLLM backend against the transformers backend: same model, same batch,
same env (the math reference env in its own process, bench.train_step's setup), plus the
sampling-vs-training logprob mismatch (`logprob_abs_diff`) each backend leaves.

    python -m bench.vllm_step_time [--model DIR] [--steps 4] [--tasks 8] [--group 4] [--max-tokens 32]

Needs the vLLM venv (`bash scripts/vllm_venv.sh`). Without --model it uses the tiny model with 2
attention heads (vLLM's CPU attention needs a head size >= 32). The vLLM server is started by the
trainer (`backend: vllm`, no URL); its start-up is reported apart from the steps. Step 1 includes
warm-up and is left out of the means.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.train_step import DATASET, EnvProcess


def vllm_tiny_model(out: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.models import build_tiny_model

    build_tiny_model(out)
    config = Qwen2Config.from_pretrained(out)
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def train_steps(model: Path, env_url: str, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> list[dict[str, Any]]:
    """bench.train_step's run (same overrides), on the backend that `extra` names."""
    import json

    from trainer.config import load_config
    from trainer.commands.train import train

    config = load_config(None, [
        f"model={model}", f"dataset={DATASET}", f"envs=[{{url: '{env_url}'}}]", f"run_dir={run_dir}",
        f"steps={args.steps}", f"tasks_per_step={args.tasks}", f"group_size={args.group}",
        f"sampling.max_tokens={args.max_tokens}", "lora.rank=16", "lora.alpha=32", "optim.lr=1e-5",
        f"grpo.micro_batch_size={args.micro_batch}", "evaluator=bench.train_step:vowel_fraction",
        f"checkpoint_every={args.steps + 1}", "progress=false", "rollout.min_group_size=2", *extra,
    ])
    train(config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(name: str, metrics: list[dict[str, Any]], wall: float) -> str:
    steady = metrics[1:] or metrics
    mean = {k: statistics.fmean(m[k] for m in steady)
            for k in ("time/generate", "time/env", "time/learn", "time/step", "logprob_abs_diff")}
    outside = wall - sum(m["time/step"] for m in metrics)
    return (f"{name:>12} {mean['time/step']:7.2f} {mean['time/generate']:9.2f} {mean['time/env']:7.2f} "
            f"{mean['time/learn']:7.2f} {mean['logprob_abs_diff']:11.2e} {outside:9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: tiny, 2 heads)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per step")
    parser.add_argument("--group", type=int, default=4, help="rollouts per task")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    print(f"machine: {os.cpu_count()} CPUs; {args.tasks} tasks x {args.group} rollouts, {args.max_tokens} new tokens, "
          f"{args.steps} steps (means over steps 2..{args.steps})")
    print(f"{'backend':>12} {'step s':>7} {'generate':>9} {'env':>7} {'learn':>7} {'logprob|d|':>11} {'startup s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = args.model or vllm_tiny_model(workdir / "tiny")
        env = EnvProcess()
        try:
            for backend, extra in (("transformers", []), ("vllm", ["backend=vllm", "vllm.max_model_len=2048"])):
                started = time.perf_counter()
                metrics = train_steps(model, env.url, workdir / backend, args, extra)
                print(summary(backend, metrics, time.perf_counter() - started), flush=True)
        finally:
            env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
