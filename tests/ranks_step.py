"""One learner step under torchrun, for tests/test_learner_ranks_equal_one_process.py:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.ranks_step MODEL_DIR OUT_DIR [fsdp]

Every rank builds the tiny learner; rank 0 sets the LoRA weights (`init_lora`) and hands them over
(`distributed.join`), then one `train_step` on `make_samples()` runs on both ranks, once per case:
token_mean and seq_mean_token_mean with the gradient sum, and token_mean with `Ranks.reduce`
replaced by a no-op (what each rank would learn alone). Each rank writes its LoRA weights per case to
OUT_DIR/rank{R}.pt. The test runs the same step in one process and compares.

With `fsdp` (`learner.fsdp: true`, tests/test_learner_fsdp_equals_one_process.py): rank 0 takes a first
token_mean step alone (as a one-process run would before a resume), hands its weights and optimizer
state over (they are then sharded), and both ranks take the second step on the sharded model; rank 0
saves its metrics (OUT_DIR/metrics.pt), the adapter (OUT_DIR/adapter) and the optimizer state
(OUT_DIR/optimizer.pt), gathered from the shards. Each rank writes how many parameters it holds.
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, load_config
from trainer.learning import distributed
from trainer.learning.learner import Learner
from trainer.types import Sample

CASES = [("token_mean", True), ("seq_mean_token_mean", True), ("token_mean", False)]


def make_config(model_dir: str | Path, loss_agg: str, fsdp: bool = False) -> TrainConfig:
    return load_config(None, defaults={
        **({"backend": "vllm"} if fsdp else {}),
        "model": str(model_dir), "dataset": "unused.jsonl", "envs": [{"url": "http://127.0.0.1:9"}],
        "device": "cpu", "dtype": "float32", "sampling": {"max_tokens": 12},
        "optim": {"lr": 0.01}, "lora": {"rank": 4, "alpha": 8},
        "grpo": {"loss_agg": loss_agg, "micro_batch_size": 3, "kl_coef": 0.05}, "learner": {"timeout_s": 60, "fsdp": fsdp},
    })


def init_lora(learner: Learner) -> None:
    """Non-zero LoRA A and B (peft starts B at 0, which leaves A without a gradient on the first step)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in learner.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def make_samples(vocab: int) -> list[Sample]:
    """3 GRPO groups of 4: a shared prompt each, completions of different lengths, mixed advantages."""
    rng = random.Random(0)
    samples = []
    for g in range(3):
        prompt = [rng.randrange(5, vocab) for _ in range(6 + 2 * g)]
        for k in range(4):
            n = 3 + (g * 4 + k) % 7
            samples.append(Sample(prompt + [rng.randrange(5, vocab) for _ in range(n)], [0] * len(prompt) + [1] * n,
                                  [0.0] * len(prompt) + [rng.uniform(-6, -2) for _ in range(n)],
                                  advantage=rng.uniform(-1, 1)))
    return samples


def lora_state(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}


def run_under_torchrun(model_dir: Path, out_dir: Path, *mode: str) -> None:
    """This script under `torchrun --nproc-per-node 2` (real processes, gloo), as the tests run it."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           "-m", "tests.ranks_step", str(model_dir), str(out_dir), *mode]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=180, env={**os.environ}, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def main(model_dir: str, out_dir: str) -> None:
    results: dict[str, Any] = {}
    config = make_config(model_dir, "token_mean")
    with distributed.launched(config) as ranks:
        assert ranks is not None and ranks.world_size == 2
        learner = Learner.from_config(config)
        fresh = copy.deepcopy(learner.optimizer.state_dict())
        for agg, reduce in CASES:
            learner.grpo = learner.grpo.model_copy(update={"loss_agg": agg})
            if not reduce:  # the negative control: each rank keeps its own gradient
                ranks.reduce = lambda params, loss, totals: (loss, totals)  # type: ignore[method-assign]
            if ranks.rank == 0:
                init_lora(learner)
                learner.optimizer.load_state_dict(fresh)
                distributed.join(learner)  # the other rank takes these weights and optimizer state
                learner.train_step(make_samples(learner.model.config.vocab_size))
                ranks.stop()  # this case is over
            else:
                ranks.follow(learner)
            results[f"{agg}/{'sum' if reduce else 'alone'}"] = lora_state(learner)
        torch.save(results, Path(out_dir) / f"rank{ranks.rank}.pt")


def main_fsdp(model_dir: str, out_dir: str) -> None:
    config = make_config(model_dir, "token_mean", fsdp=True)
    with distributed.launched(config) as ranks:
        assert ranks is not None and ranks.world_size == 2 and ranks.fsdp
        learner = Learner.from_config(config)
        if ranks.rank == 0:
            init_lora(learner)
            samples = make_samples(learner.model.config.vocab_size)
            learner.train_step(samples)  # alone: the other rank waits in `follow`
            distributed.join(learner)  # rank 0's weights and optimizer state go to the other rank, then both shard
            torch.save(learner.train_step(samples), Path(out_dir) / "metrics.pt")
            learner.save_adapter(Path(out_dir) / "adapter")
            torch.save(learner.state_dict()["optimizer"], Path(out_dir) / "optimizer.pt")
        else:
            ranks.follow(learner)
        full = sum(p.numel() for p in learner.model.parameters())
        local = sum(p.to_local().numel() for p in learner.model.parameters())
        torch.save({"params": full, "local": local}, Path(out_dir) / f"rank{ranks.rank}.pt")


if __name__ == "__main__":
    (main_fsdp if sys.argv[3:] == ["fsdp"] else main)(*sys.argv[1:3])
