"""Fault-suite harness: flaky env servers as real processes, short training runs of the tiny model,
and the accounting every faulted run must pass (each rollout once in its step's dump, the step's
metrics counting it as finished or failed by kind, each finished rollout of a trained group in the
trained samples exactly once, nothing else there)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import trainer.commands.train as run_module
from env_sdk.models import SUCCESS_CODES
from tests.helpers import free_port
from trainer.config import TrainConfig
from trainer.types import status_kind

REPO = Path(__file__).resolve().parents[2]


# --- env servers as processes ------------------------------------------------------------------


class FlakyEnv:
    """`python -m tests.faults.flaky_env` on a loopback port: start, SIGKILL, restart, events."""

    def __init__(self, *args: str, log_dir: Path, port: int | None = None) -> None:
        self.args, self.port, self.log_dir = list(args), port or free_port(), log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> FlakyEnv:
        self.starts += 1
        log = (self.log_dir / f"env-{self.port}-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.flaky_env", "--port", str(self.port), *self.args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flaky env exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"flaky env did not come up on {self.url}: {self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no answers, its rollouts are gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Killed outright: a test env may hold requests open forever (a graceful stop would wait)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def events(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_events", timeout=10).json()

    def in_flight(self) -> int:
        return int(httpx.get(f"{self.url}/health", timeout=5).json()["in_flight"])

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob(f"env-{self.port}-*.log")))


@contextlib.contextmanager
def flaky_envs(log_dir: Path) -> Iterator[Any]:
    """A factory of started FlakyEnvs, all stopped at the end."""
    made: list[FlakyEnv] = []

    def make(*args: str, port: int | None = None) -> FlakyEnv:
        env = FlakyEnv(*args, log_dir=log_dir, port=port)
        made.append(env)
        return env.start()

    try:
        yield make
    finally:
        for env in made:
            env.stop()


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# --- short training runs --------------------------------------------------------------------------


def write_dataset(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say something about {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def short_config(tmp_path: Path, model: Path, urls: list[str], **overrides: Any) -> dict[str, Any]:
    """A 2-step run, 2 tasks x 4 rollouts, 8 new tokens, 5 s rollout deadline; `overrides` replace
    top-level keys and merge into sections (`rollout={"deadline_s": 2}`)."""
    config: dict[str, Any] = {
        "model": str(model),
        "dataset": str(write_dataset(tmp_path / "tasks.jsonl")),
        "envs": [{"url": u} for u in urls],
        "steps": 2, "tasks_per_step": 2, "group_size": 4,
        "sampling": {"max_tokens": 8},
        "lora": {"rank": 4, "alpha": 8},
        "optim": {"lr": 1e-2},
        "grpo": {"micro_batch_size": 8},
        "rollout": {"deadline_s": 5.0, "max_retries": 2, "poll_s": 1.0},
        "checkpoint_every": 100, "seed": 3, "threads": 1,
        "run_dir": str(tmp_path / "run"), "progress": False,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class Run:
    config: TrainConfig
    run_dir: Path
    seconds: float
    error: BaseException | None = None
    steps: list[tuple[Any, Any]] = field(default_factory=list)  # (groups, StepBatch) per step, in order

    @property
    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def dump(self, step: int) -> list[dict[str, Any]]:
        path = self.run_dir / "rollouts" / f"step_{step:06d}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def rollouts(self) -> list[dict[str, Any]]:
        return [r for m in self.metrics for r in self.dump(m["step"])]

    def failures(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for m in self.metrics:
            total.update({k.removeprefix("failures/"): int(v) for k, v in m.items() if k.startswith("failures/")})
        return total


class _Capture:
    """Records each step's groups and trained batch by wrapping trainer.commands.train.build_batch."""

    def __init__(self, run: Run) -> None:
        self.run, self.real = run, run_module.build_batch

    def __call__(self, groups: Any, config: Any) -> Any:
        batch = self.real(groups, config)
        self.run.steps.append((groups, batch))
        return batch


_train_lock = threading.Lock()  # build_batch is patched module-wide: one run at a time


def start_run(config: dict[str, Any], *, resume: bool = False) -> tuple[threading.Thread, Run]:
    """Start `trainer.commands.train.train` in a thread (its own asyncio loop); the test acts meanwhile."""
    cfg = TrainConfig.model_validate(config)
    run = Run(cfg, Path(cfg.run_dir), 0.0)

    def target() -> None:
        with _train_lock:
            capture = _Capture(run)
            run_module.build_batch = capture  # type: ignore[assignment]
            t0 = time.monotonic()
            try:
                run_module.train(cfg, resume=resume)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                run.error = exc
            finally:
                run.seconds = time.monotonic() - t0
                run_module.build_batch = capture.real

    thread = threading.Thread(target=target, name="train", daemon=True)
    thread.start()
    return thread, run


def train_run(config: dict[str, Any], timeout_s: float = 120.0) -> Run:
    thread, run = start_run(config)
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the training run did not end within {timeout_s}s"
    return run


# --- accounting -----------------------------------------------------------------------------------


def check_accounting(run: Run) -> None:
    """Every rollout of every step accounted for exactly once (see the module docstring)."""
    cfg = run.config
    metrics = run.metrics
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    per_step = cfg.tasks_per_step * cfg.group_size
    seen: set[str] = set()
    for m in metrics:
        rows = run.dump(m["step"])
        ids = [r["rollout_id"] for r in rows]
        assert len(rows) == per_step, f"step {m['step']}: {len(rows)} rollouts dumped, {per_step} started"
        assert not seen & set(ids) and len(set(ids)) == len(ids), "a rollout id appears twice"
        seen |= set(ids)
        ok = [r for r in rows if r["status"]["code"] in SUCCESS_CODES and r["reward"] is not None]
        failed = [r for r in rows if r not in ok]
        assert m["rollouts/finished"] == len(ok) and m["rollouts/failed"] == len(failed), m
        counted = {k.removeprefix("failures/"): int(v) for k, v in m.items() if k.startswith("failures/")}
        assert counted == dict(Counter(status_kind(r["status"]["code"]) for r in failed)), (counted, failed)
        retried = {k: int(v) for k, v in m.items() if k.startswith("retries/")}
        assert sum(retried.values()) == m["rollouts/retries"] == sum(r["attempts"] - 1 for r in rows), m
        for r in ok:
            assert 0.0 <= r["reward"] <= 1.0 and r["num_calls"] >= 1, r
        for r in failed:
            assert r["status"]["message"], f"failure without a message: {r}"
        # trained = the finished rollouts of groups with enough of them and unequal rewards
        by_group: dict[int, list[dict[str, Any]]] = {}
        for r in ok:
            by_group.setdefault(r["group"], []).append(r)
        expected = {r["rollout_id"] for g in by_group.values() if len(g) >= cfg.rollout.min_group_size
                    and max(x["reward"] for x in g) - min(x["reward"] for x in g) >= 1e-9 for r in g}
        assert {r["rollout_id"] for r in rows if r["trained"]} == expected, f"step {m['step']}: trained flags"
        assert m["samples"] == sum(r["num_calls"] for r in rows if r["trained"])  # one-call agents: a sample each
    # the trained samples (in-process runs): exactly the finished rollouts of the trained groups
    assert len(run.steps) == len(metrics) or not run.steps
    for m, (groups, batch) in zip(metrics, run.steps):
        rollouts = {r.rollout_id: r for g in groups for r in g.rollouts}
        assert set(rollouts) == {r["rollout_id"] for r in run.dump(m["step"])}
        expected: Counter[str] = Counter()
        for g in groups:
            finished = g.finished
            rewards = [r.reward for r in finished]
            if len(finished) >= cfg.rollout.min_group_size and max(rewards) - min(rewards) >= 1e-9:
                expected.update({r.rollout_id: len(r.calls) for r in finished})
        trained = Counter(s.rollout_id for s in batch.samples)
        assert trained == expected, f"step {m['step']}: trained {dict(trained)}, expected {dict(expected)}"
        for s in batch.samples:  # each sample is its rollout's recorded tokens
            call = rollouts[s.rollout_id].calls[0]
            assert s.input_ids[: len(call.prompt_ids)] == call.prompt_ids
        assert m["samples"] == len(batch.samples)
        assert m["groups/trained"] + m["groups/dropped"] + m["groups/all_equal"] == cfg.tasks_per_step
