"""The learner's peak memory and step time by allocator and gradient checkpointing.

    python -m bench.learner_memory                       # SmolLM2-135M, 8 prompts x 4, 40 + 32 tokens
    python -m bench.learner_memory --model tiny --steps 2

Each configuration runs in its own subprocess (an allocator is chosen when a process starts): the
learner alone, on fixed GRPO-shaped samples (a group's rollouts share their prompt), fp32 on CPU,
micro-batches of 8, LoRA r16 on the 7 projections. "over model" is the peak resident memory
(sampled every 2 ms) minus the process's resident memory once the weights are loaded and touched:
what a step needs. The last line gives each configuration's ratios against glibc without
checkpointing, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [("glibc", False), ("jemalloc", False), ("glibc", True), ("jemalloc", True)]


def measure(model: str, steps: int, checkpointing: bool, threads: int, work: Path) -> dict[str, float]:
    """In this process: load the learner, run `steps` steps, return peak RSS figures and step times."""
    import psutil
    import torch

    from trainer.config import GrpoConfig, LoraConfig, OptimConfig
    from trainer.learning.learner import Learner
    from trainer.learning.samples import Sample

    torch.set_num_threads(threads)
    if model == "tiny":
        from trainer.models import build_tiny_model

        model_dir = build_tiny_model(work / "tiny")
    else:
        from trainer.models.smollm2 import convert_smollm2

        model_dir = convert_smollm2()
    learner = Learner(model_dir, lora=LoraConfig(rank=16, alpha=32), optim=OptimConfig(),
                      grpo=GrpoConfig(gradient_checkpointing=checkpointing, micro_batch_size=8), max_tokens=32,
                      device="cpu", dtype="float32")
    vocab = learner.model.config.vocab_size
    rng = random.Random(0)
    samples = []
    for _ in range(8):
        prompt = [rng.randrange(10, vocab) for _ in range(40)]
        for _ in range(4):
            ids = prompt + [rng.randrange(10, vocab) for _ in range(32)]
            samples.append(Sample(ids, [0] * 40 + [1] * 32, [0.0] * 40 + [-5.0] * 32, advantage=rng.uniform(-1, 1)))
    proc = psutil.Process()
    with torch.no_grad():  # touch every weight once: the model's pages count in the base
        learner.model(input_ids=torch.tensor([samples[0].input_ids]))
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample_rss() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    threading.Thread(target=sample_rss, daemon=True).start()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        learner.train_step(samples)
        times.append(time.perf_counter() - t0)
    done.set()
    return {"base_mb": base / 2**20, "peak_mb": peak[0] / 2**20, "over_mb": (peak[0] - base) / 2**20,
            "step_s": statistics.median(times[1:] or times)}


def run_config(allocator: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, float] | None:
    from trainer.commands.allocator import find_jemalloc

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator == "jemalloc":
        lib = find_jemalloc()
        if lib is None:
            return None
        env["LD_PRELOAD"] = lib
    cmd = [sys.executable, "-m", "bench.learner_memory", "--child", "--model", args.model, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--checkpointing"] if checkpointing else [])
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{allocator} checkpointing={checkpointing} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=3, help="the first warms up; step time is the median of the rest")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory(prefix="bench-learner-memory-") as tmp:
            print(json.dumps(measure(args.model, args.steps, args.checkpointing, args.threads, Path(tmp))))
        return 0
    rows = {}
    print(f"model={args.model} steps={args.steps} threads={args.threads}; 8 prompts x 4, 40 + 32 tokens, micro-batch 8")
    print(f"{'allocator':<9} {'ckpt':<5} {'model MB':>8} {'peak MB':>8} {'over model':>10} {'s/step':>7}")
    for allocator, ckpt in CONFIGS:
        r = run_config(allocator, ckpt, args)
        if r is None:
            print(f"{allocator:<9} {str(ckpt).lower():<5} skipped: libjemalloc2 not installed (apt-get install libjemalloc2)")
            continue
        rows[(allocator, ckpt)] = r
        print(f"{allocator:<9} {str(ckpt).lower():<5} {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['over_mb']:>10.0f} "
              f"{r['step_s']:>7.2f}")
    ref = rows[("glibc", False)]
    parts = [f"{a}{'+ckpt' if c else ''}: peak={r['peak_mb'] / ref['peak_mb']:.2f} over_model={r['over_mb'] / ref['over_mb']:.2f} "
             f"step_time={r['step_s'] / ref['step_s']:.2f}" for (a, c), r in rows.items() if (a, c) != ("glibc", False)]
    print("RATIOS vs glibc without checkpointing: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
