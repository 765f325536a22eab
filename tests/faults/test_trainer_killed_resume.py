"""Fault 10: the trainer itself is SIGKILLed -- once mid-step (rollouts in flight), once right after
a step's checkpoint (between steps) -- and each time restarted with `--resume`. The finished run
has every step once, each step's rollouts and trained samples once, the data order of an unbroken
run, and an optimizer that took exactly one update per step: no sample lost, none trained twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.faults.harness import (
    REPO,
    Run,
    check_accounting,
    short_config,
    wait_until,
    write_dataset,
)
from trainer.config import TrainConfig
from trainer.data import TaskStream

STEPS, TASKS, PER_STEP = 3, 4, 2


def openrft(*args: str, log: Path) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).with_name("openrft")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "trainer.cli"]
    return subprocess.Popen([*cmd, *args], cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigkill_mid_step_and_between_steps_then_resume(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    env = envs("--delay", "0.3")  # rollouts take a while: there is a "mid-step" to kill in
    config = short_config(tmp_path, tiny_model, [env.url], steps=STEPS, tasks_per_step=PER_STEP,
                          checkpoint_every=1, rollout={"deadline_s": 30.0})
    config["dataset"] = str(write_dataset(tmp_path / "tasks.jsonl", TASKS))
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    run_dir, log = Path(config["run_dir"]), tmp_path / "trainer.log"

    # 1. killed mid-step 2: step 1 is done and checkpointed, step 2's rollouts are running
    proc = openrft("train", str(cfg_path), log=log)
    try:
        wait_until(lambda: steps_done(run_dir) == 1 and any(r.startswith("s2-") for r in env.events()["starts"]),
                   120, f"step 2 under way\n{log.read_text()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    killed_step2 = {r for r in env.events()["starts"] if r.startswith("s2-")}
    assert steps_done(run_dir) == 1

    # 2. resumed, then killed as soon as step 2's checkpoint is on disk (between steps 2 and 3)
    proc = openrft("train", str(cfg_path), "--resume", log=log)
    try:
        wait_until(lambda: (run_dir / "checkpoints" / "step_000002" / "trainer_state.pt").is_file(), 120,
                   f"step 2's checkpoint\n{log.read_text()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()

    # a kill can also land in the middle of writing a metrics line: the resume must shrug it off
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "reward/mean": 0.')

    # 3. resumed to the end
    proc = openrft("train", str(cfg_path), "--resume", log=log)
    try:
        assert proc.wait(120) == 0, log.read_text()
    finally:
        proc.kill()

    run = Run(TrainConfig.model_validate(config), run_dir, 0.0)
    check_accounting(run)  # every step once; each rollout once; trained flags match the samples count
    assert [m["step"] for m in run.metrics] == list(range(1, STEPS + 1))
    stream = TaskStream(TASKS, seed=config["seed"])
    for step in range(1, STEPS + 1):  # the data order of a run that was never interrupted
        rows = run.dump(step)
        assert [i for _, i in sorted({(r["group"], r["task_index"]) for r in rows})] == stream.take(PER_STEP)
    final_step2 = {r["rollout_id"] for r in run.dump(2)}
    assert killed_step2 and not killed_step2 & final_step2  # the killed attempt's rollouts were not kept
    assert sum(m["samples"] for m in run.metrics) == sum(r["trained"] for r in run.rollouts())

    state = torch.load(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "trainer_state.pt", weights_only=False)
    assert state["step"] == STEPS and state["data"]["epoch"] == 1 and state["data"]["position"] == 2  # 6 = 4 + 2
    # one optimizer update per step, none repeated, none lost (steps with no trained group
    # take no update: count those out)
    updates = sum(1 for m in run.metrics if m["samples"] > 0)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {updates}
    assert "Traceback" not in log.read_text()
