"""The learner's peak memory and step time by allocator, gradient checkpointing and learner ranks.

    python -m bench.learner_memory                       # SmolLM2-135M, 8 prompts x 4, 40 + 32 tokens
    python -m bench.learner_memory --model tiny --steps 2
    python -m bench.learner_memory --model tiny --ranks 1 2   # also data-parallel: 2 ranks (torchrun, gloo)
    python -m bench.learner_memory --model tiny --ranks 1 2 --fsdp   # 2 ranks sharding the model (FSDP2)

Each configuration runs in its own subprocess (an allocator is chosen when a process starts): the
learner alone, on fixed GRPO-shaped samples (a group's rollouts share their prompt), fp32 on CPU,
micro-batches of 8, LoRA r16 on the 7 projections. "over model" is the peak resident memory
(sampled every 2 ms) minus the process's resident memory once the weights are loaded and touched:
what a step needs. With 2 ranks each rank is a process of its own (`torchrun --nproc-per-node 2`,
gloo) taking its share of the same samples (trainer/learning/distributed.py); the figures are the
largest rank's, the step time rank 0's (it includes the gradient sum). With `--fsdp` the ranks shard the
model instead (`learner.fsdp`, trainer/learning/fsdp.py): "model MB" is then measured once sharded, and
"params MB" is the parameters a rank holds (its shards; the whole model without fsdp). The last line gives each
configuration's ratios against glibc without checkpointing at 1 rank, measured in the same run.
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


def model_dir(model: str, work: Path) -> Path:
    """The model's directory, made once by the parent (the ranks of a run share it)."""
    if model == "tiny":
        from trainer.models import build_tiny_model

        return build_tiny_model(work / "tiny")
    from trainer.models.smollm2 import convert_smollm2

    return convert_smollm2()


def measure(model: Path, steps: int, checkpointing: bool, threads: int, fsdp: bool) -> dict[str, float]:
    """In this process: load the learner, run `steps` steps, return peak RSS figures and step times."""
    import psutil
    import torch

    from trainer.config import GrpoConfig, LoraConfig, OptimConfig
    from trainer.learning.learner import Learner
    from trainer.learning.samples import Sample

    torch.set_num_threads(threads)
    ranks = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from trainer.learning.distributed import Ranks

        dist.init_process_group("gloo")
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), timeout_s=600, fsdp=fsdp)
    learner = Learner(model, lora=LoraConfig(rank=16, alpha=32), optim=OptimConfig(),
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
    if ranks is not None:  # every rank: rank 0's LoRA weights (and, with fsdp, the model sharded)
        ranks.join(learner)
    params = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in learner.model.parameters())
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
    if ranks is not None and ranks.rank > 0:
        ranks.follow(learner)  # rank 0's steps, until it stops
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            learner.train_step(samples)
            times.append(time.perf_counter() - t0)
        if ranks is not None:
            ranks.stop()
    done.set()
    return {"base_mb": base / 2**20, "peak_mb": peak[0] / 2**20, "over_mb": (peak[0] - base) / 2**20,
            "step_s": statistics.median(times[1:] or times) if times else 0.0, "params_mb": params / 2**20}


def run_config(allocator: str, checkpointing: bool, ranks: int, args: argparse.Namespace) -> dict[str, float] | None:
    from trainer.commands.allocator import find_jemalloc

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator == "jemalloc":
        lib = find_jemalloc()
        if lib is None:
            return None
        env["LD_PRELOAD"] = lib
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                "--max-restarts=0"] if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "bench.learner_memory", "--child", "--model-dir", str(args.model_dir), "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--checkpointing"] if checkpointing else []) + (
           ["--fsdp"] if args.fsdp and ranks > 1 else [])
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{allocator} checkpointing={checkpointing} failed:\n{out.stderr[-3000:]}")
    per_rank = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {"base_mb": max(r["base_mb"] for r in per_rank), "peak_mb": max(r["peak_mb"] for r in per_rank),
            "over_mb": max(r["over_mb"] for r in per_rank), "step_s": max(r["step_s"] for r in per_rank),
            "params_mb": max(r["params_mb"] for r in per_rank)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=3, help="the first warms up; step time is the median of the rest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each rank")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1], help="learner world sizes to measure, e.g. 1 2")
    parser.add_argument("--fsdp", action="store_true", help="at more than one rank, shard the model (learner.fsdp)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model_dir, args.steps, args.checkpointing, args.threads, args.fsdp)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-learner-memory-") as tmp:
        args.model_dir = model_dir(args.model, Path(tmp))
        return report(args)


def report(args: argparse.Namespace) -> int:
    rows = {}
    print(f"model={args.model} steps={args.steps} threads={args.threads}/rank; 8 prompts x 4, 40 + 32 tokens, micro-batch 8")
    print(f"{'ranks':>5} {'allocator':<9} {'ckpt':<5} {'model MB':>8} {'peak MB':>8} {'over model':>10} {'s/step':>7} "
          f"{'params MB':>9} fsdp")
    for ranks in args.ranks:
        for allocator, ckpt in CONFIGS:
            r = run_config(allocator, ckpt, ranks, args)
            if r is None:
                print(f"{ranks:>5} {allocator:<9} {str(ckpt).lower():<5} skipped: libjemalloc2 not installed "
                      "(apt-get install libjemalloc2)")
                continue
            rows[(ranks, allocator, ckpt)] = r
            print(f"{ranks:>5} {allocator:<9} {str(ckpt).lower():<5} {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f} "
                  f"{r['over_mb']:>10.0f} {r['step_s']:>7.2f} {r['params_mb']:>9.1f} {str(args.fsdp and ranks > 1).lower()}")
    ref = rows[(args.ranks[0], "glibc", False)]
    parts = [f"{'' if n == 1 else f'{n} ranks ' + ('fsdp ' if args.fsdp else '')}{a}{'+ckpt' if c else ''}: peak={r['peak_mb'] / ref['peak_mb']:.2f} "
             f"over_model={r['over_mb'] / ref['over_mb']:.2f} step_time={r['step_s'] / ref['step_s']:.2f}"
             for (n, a, c), r in rows.items() if (n, a, c) != (args.ranks[0], "glibc", False)]
    print(f"RATIOS vs glibc without checkpointing at {args.ranks[0]} rank(s) (peak, over model: per rank): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
