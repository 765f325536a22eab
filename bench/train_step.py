"""Time per GRPO step, split into generate / env / learn, and batched vs one-at-a-time generation
at 64 concurrent rollouts.

    python -m bench.train_step [--model tiny|smollm2|DIR] [--steps 4] [--tasks 8] [--group 4]
                               [--max-tokens 32] [--dtype float32|bfloat16] [--threads N] [--skip-batching]

The env is the math reference env served by uvicorn in a subprocess (as in production: its own
process), its tasks from reference_envs/math/train.jsonl. The reward comes from a trainer-side
evaluator (fraction of vowels in the reply) so every group has spread and every step really runs
the learner, as TRL's GRPOTrainer always does: an all-equal step would time nothing.

Part 1 runs `openrft train` for --steps steps and prints each step's split from metrics.jsonl
(the first step includes warm-up and is left out of the mean).
Part 2 runs 64 rollouts (16 tasks x 4) through gateway + env with the backend batching up to 64
requests, then one request at a time (max_batch_size 1), and prints tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/train_step.py`: import this checkout's packages
    sys.path.insert(0, str(REPO))

from bench.vs_openenv import ServerProcess  # noqa: E402

DATASET = REPO / "reference_envs" / "math" / "train.jsonl"


def vowel_fraction(messages: list[dict[str, Any]], ground_truth: Any, info: dict[str, Any]) -> float:
    """Trainer-side evaluator of the bench: continuous, so groups are never all equal."""
    from bench.vs_trl import vowel_fraction as score

    return score(str(messages[-1].get("content") or "") if messages else "")


def resolve_model(name: str, workdir: Path) -> Path:
    if name == "tiny":
        from trainer.models import build_tiny_model

        return build_tiny_model(workdir / "tiny")
    if name == "smollm2":
        from trainer.models.smollm2 import convert_smollm2

        return convert_smollm2()
    return Path(name)


def train_steps(model: Path, env_url: str, workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from trainer.config import load_config
    from trainer.commands.train import train

    config = load_config(None, [
        f"model={model}", f"dataset={DATASET}", f"envs=[{{url: '{env_url}'}}]", f"run_dir={workdir / 'run'}",
        f"steps={args.steps}", f"tasks_per_step={args.tasks}", f"group_size={args.group}",
        f"sampling.max_tokens={args.max_tokens}", "lora.rank=16", "lora.alpha=32", "optim.lr=1e-5",
        f"grpo.micro_batch_size={args.micro_batch}", "evaluator=bench.train_step:vowel_fraction",
        f"checkpoint_every={args.steps + 1}", "progress=false", "rollout.min_group_size=2", f"dtype={args.dtype}",
        f"threads={args.threads}",
    ])
    run_dir = train(config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


async def _rollout_throughput(model_dir: Path, env_url: str, max_batch_size: int, max_tokens: int) -> tuple[float, int]:
    from trainer.generation import TransformersBackend
    from trainer.config import EnvEndpoint
    from trainer.data import load_tasks
    from trainer.gateway import Gateway
    from trainer.models import load_model
    from trainer.gateway.server import serve_gateway
    from trainer.rollouts import EnvPool, GatewayEndpoint, RolloutScheduler

    model, tok = load_model(model_dir)
    backend = TransformersBackend(model.eval(), tok, max_batch_size=max_batch_size, seed=0)
    gateway = Gateway(backend, tok, default_max_tokens=max_tokens)
    pool = EnvPool([EnvEndpoint(url=env_url)])
    tasks = load_tasks(DATASET)[:16]
    try:
        async with serve_gateway(gateway.app, "127.0.0.1", 0, None) as url:
            sched = RolloutScheduler(pool, GatewayEndpoint(gateway, url),
                                     completion_params={"model": "policy", "max_tokens": max_tokens, "temperature": 1.0},
                                     evaluator=vowel_fraction, deadline_s=600, max_retries=0, max_in_flight=64,
                                     run_id="bench")
            started = time.perf_counter()
            groups = await sched.run_groups(list(enumerate(tasks)), 4, step=1)
            elapsed = time.perf_counter() - started
    finally:
        backend.close()
        await pool.aclose()
    tokens = sum(len(c.completion_ids) for g in groups for r in g.rollouts for c in r.calls)
    failed = sum(not r.ok for g in groups for r in g.rollouts)
    if failed:
        raise RuntimeError(f"{failed} of 64 rollouts failed")
    return elapsed, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model directory")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per step")
    parser.add_argument("--group", type=int, default=4, help="rollouts per task")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the trainer's, CPUs - 1)")
    parser.add_argument("--skip-batching", action="store_true", help="only part 1")
    args = parser.parse_args(argv)
    import torch

    args.threads = args.threads or max(1, (os.cpu_count() or 1) - 1)  # the trainer's own default
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = resolve_model(args.model, workdir)
        env = ServerProcess("math-env", workers=1, http="auto", log_dir=workdir,
                            factory="reference_envs.math.server:create_app")
        try:
            env.wait_ready()
            metrics = train_steps(model, env.base_url, workdir, args)
            print(f"\nGRPO step ({args.model}, {args.dtype}, {torch.get_num_threads()} threads: {args.tasks} tasks x {args.group} rollouts, "
                  f"{args.max_tokens} new tokens)")
            print(f"{'step':>4} {'generate':>9} {'env':>7} {'learn':>7} {'step':>7} {'tok/s':>7} {'reward':>7}")
            for m in metrics:
                print(f"{m['step']:>4} {m['time/generate']:>9.2f} {m['time/env']:>7.2f} {m['time/learn']:>7.2f} "
                      f"{m['time/step']:>7.2f} {m['tokens_per_s']:>7.0f} {m['reward/mean']:>7.3f}")
            steady = metrics[1:] or metrics
            mean = {k: statistics.fmean(m[k] for m in steady) for k in ("time/generate", "time/env", "time/learn", "time/step")}
            print(f"mean {mean['time/generate']:>9.2f} {mean['time/env']:>7.2f} {mean['time/learn']:>7.2f} "
                  f"{mean['time/step']:>7.2f}   (steps 2..{len(metrics)})")
            if not args.skip_batching:
                print(f"\ngeneration at 64 concurrent rollouts (16 tasks x 4, {args.max_tokens} new tokens, through gateway + env)")
                rates = {}
                for size in (64, 1):
                    elapsed, tokens = asyncio.run(_rollout_throughput(model, env.base_url, size, args.max_tokens))
                    rates[size] = tokens / elapsed
                    print(f"  max_batch_size={size:>2}: {elapsed:6.2f} s, {tokens} tokens, {rates[size]:7.1f} tokens/s")
                print(f"batched / one-at-a-time throughput: {rates[64] / rates[1]:.1f}x")
            print(f"seconds per GRPO step (steady): {mean['time/step']:.2f}  "
                  f"[generate {mean['time/generate']:.2f} | env {mean['time/env']:.2f} | learn {mean['time/learn']:.2f}]")
        finally:
            env.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
