"""`openrft train --nproc 2` (torchrun, gloo on CPU, real processes, a real env server on loopback):
a run started with one process resumes under two ranks (world size 1 -> 2); then learner rank 1 is
SIGKILLed during step 3, and the run ends within a bounded time with a clear error naming the newest
checkpoint, its env servers stopped, never a hang; the run then resumes from that checkpoint with one
process (2 -> 1) and finishes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from env_sdk import AgentResult, RolloutTask, create_env_app
from tests.helpers import serve_app
from trainer.commands.train import main

REPO = Path(__file__).resolve().parent.parent


async def vowel_agent(task: RolloutTask, client: Any) -> AgentResult:
    """One model call; reward = fraction of vowels in the reply (continuous: groups rarely tie)."""
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)),
                       messages=[*task.messages, {"role": "assistant", "content": text}], termination_reason="stop")


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_pid(root: int, rank: str) -> int | None:
    """The process under `root` that torchrun started as `rank` (read from Linux's /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    below, todo = [], [root]
    while todo:
        pid = todo.pop()
        children = [c for c, p in parents.items() if p == pid]
        below += children
        todo += children
    for pid in below:
        with contextlib.suppress(OSError):
            env = dict(v.split("=", 1) for v in (Path("/proc") / str(pid) / "environ").read_text().split("\0") if "=" in v)
            if env.get("RANK") == rank and "LOCAL_RANK" in env:
                return pid
    return None


def test_resume_from_one_to_two_ranks_then_a_killed_rank_ends_the_run(tmp_path: Path, tiny_model: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {i}"}]} for i in range(8)]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with serve_app(create_env_app(vowel_agent)) as env_url:
        config = {"model": str(tiny_model), "dataset": str(tmp_path / "tasks.jsonl"), "envs": [{"url": env_url}],
                  "steps": 1, "tasks_per_step": 2, "group_size": 4, "sampling": {"max_tokens": 12},
                  "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2}, "rollout": {"deadline_s": 60},
                  "learner": {"timeout_s": 60}, "checkpoint_every": 1, "seed": 7, "device": "cpu",
                  "run_dir": str(tmp_path / "run"), "progress": False}
        cfg = tmp_path / "train.yaml"
        cfg.write_text(yaml.safe_dump(config))
        run_dir = tmp_path / "run"
        assert main([str(cfg)]) == 0  # step 1: one process

        # steps 2-3 under two ranks; rank 1 is killed once step 2's checkpoint is written
        log = tmp_path / "ranks.log"
        proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", str(cfg), "--resume", "--nproc", "2",
                                 "--set", "steps=3"], cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 120
            while not (run_dir / "checkpoints" / "step_000002" / "trainer_state.pt").is_file():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.05)
            rank1 = rank_pid(proc.pid, "1")
            assert rank1 is not None, "no process with RANK=1 under the launcher"
            os.kill(rank1, signal.SIGKILL)
            killed = time.monotonic()
            code = proc.wait(timeout=60)  # bounded: a dead rank never hangs the run
            took = time.monotonic() - killed
        finally:
            proc.kill()
        out = log.read_text()
        assert code != 0, out
        assert "openrft train: error: rank 0/2" in out, out[-4000:]
        assert f"The newest checkpoint is {run_dir / 'checkpoints' / 'step_000002'}" in out, out[-4000:]
        assert "the run's 2 ranks stopped" in out
        assert took < 45, took
        assert steps_logged(run_dir) == [1, 2]  # step 2 trained by two ranks from a one-rank checkpoint
        assert not (run_dir / "checkpoints" / "step_000003").exists()

        # back to one process, from step 2's checkpoint
        assert main([str(cfg), "--resume", "--set", "steps=3"]) == 0
        assert steps_logged(run_dir) == [1, 2, 3]
