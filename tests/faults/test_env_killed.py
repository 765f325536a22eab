"""Fault 1: the env server is SIGKILLed mid-rollout, then restarted on the same port. The rollouts
it held are lost with it; the trainer notices (the status poll fails), retries each of them under a
fresh id once the env answers again, and the run finishes with every rollout accounted for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.faults.harness import check_accounting, short_config, start_run, wait_until


def test_env_killed_mid_rollout_then_restarted(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    env = envs("--delay", "1.0")  # each rollout takes a second: a kill lands mid-rollout
    thread, run = start_run(short_config(tmp_path, tiny_model, [env.url], rollout={"max_retries": 3}))
    wait_until(lambda: env.in_flight() >= 4, 60, "rollouts in flight on the env")
    held = set(env.events()["starts"])
    env.kill()
    killed_at = time.monotonic()
    env.start()  # a fresh process on the same port: it knows none of the old rollouts
    restarted_after = time.monotonic() - killed_at
    thread.join(120)
    assert not thread.is_alive() and run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {}, (run.failures(), restarted_after)
    step1 = run.dump(1)
    retried = [r for r in step1 if r["attempts"] > 1]
    assert retried and run.metrics[0]["rollouts/retries"] >= len(retried)
    assert run.metrics[0]["retries/unavailable"] == run.metrics[0]["rollouts/retries"]  # by kind
    # every rollout the killed env held was retried under a new id and finished on the new process
    for r in step1:
        first_id = r["rollout_id"].split(".")[0]
        if first_id in held:
            assert r["rollout_id"] != first_id and r["reward"] is not None
    assert set(env.events()["starts"]) >= {r["rollout_id"] for r in retried}


def test_env_killed_for_good_opens_the_circuit_breaker(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    """Killed and never restarted: instead of spinning through the remaining steps on failures, the
    run stops with a message naming the env and the error, and keeps the steps that finished."""
    env = envs("--delay", "0.5")
    config = short_config(tmp_path, tiny_model, [env.url], steps=5, checkpoint_every=10,
                          rollout={"max_retries": 0, "max_consecutive_failures": 4})
    thread, run = start_run(config)
    wait_until(lambda: (run.run_dir / "metrics.jsonl").is_file() and env.in_flight() >= 4, 60, "step 2 under way")
    env.kill()
    killed_at = time.monotonic()
    thread.join(60)
    assert not thread.is_alive()
    assert time.monotonic() - killed_at < 20
    message = str(run.error)
    assert type(run.error).__name__ == "RunError", repr(run.error)
    assert "step 2: stopped by the circuit breaker" in message and "4 rollouts in a row" in message
    assert env.url in message and "unavailable" in message and "--resume" in message
    assert [m["step"] for m in run.metrics] == [1]
    assert (run.run_dir / "checkpoints" / "step_000001" / "trainer_state.pt").is_file()  # step 1 is kept
