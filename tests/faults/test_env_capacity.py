"""Fault 7: the env is at capacity and answers 429 with Retry-After. The client waits as told before
asking again (never sooner), the scheduler retries what stayed refused, and every rollout runs in
the end: capacity is back-pressure, not failure."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from tests.faults.harness import check_accounting, short_config, train_run


def test_429_is_waited_out(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    env = envs("--capacity", "2", "--delay", "0.3")  # 8 rollouts a step, 2 at a time, Retry-After: 1
    run = train_run(short_config(tmp_path, tiny_model, [env.url], steps=1, rollout={"deadline_s": 20.0}))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {}
    inits = env.events()["inits"]
    refused = {rid: answers for rid, answers in inits.items() if any(code == 429 for _, code in answers)}
    assert refused, "the env was never at capacity"
    for rid, answers in refused.items():
        for (t_429, code), (t_next, _) in itertools.pairwise(answers):
            if code == 429:  # the next try of the same id waited for Retry-After (1 s)
                assert t_next - t_429 >= 0.95, (rid, answers)
    started = {rid for rid, answers in inits.items() if any(code == 202 for _, code in answers)}
    trained = {r["rollout_id"] for r in run.rollouts()}
    assert trained <= started  # each dumped rollout is one the env accepted


def test_waiting_for_capacity_does_not_eat_the_deadline(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    """The deadline is the env's time to run a rollout, counted from when the env accepts it (as the
    env counts it): rollouts queued behind 429s for most of a deadline still get all of it."""
    env = envs("--capacity", "2", "--delay", "1.5")  # 4 waves of 1.5 s: the last starts ~4.5 s in
    run = train_run(short_config(tmp_path, tiny_model, [env.url], steps=1, rollout={"deadline_s": 5.0}))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {}, [r["status"]["message"] for r in run.rollouts() if r["reward"] is None]
