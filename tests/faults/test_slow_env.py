"""Fault 12: one slow env among fast ones. The step waits for the slow env's rollouts only up to
the rollout deadline -- then cancels them, counts them as deadline_exceeded, and trains on the rest;
the fast env's rollouts are not held back by them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.faults.harness import check_accounting, short_config, train_run

DEADLINE_S = 3.0


def test_slow_env_does_not_hold_the_step(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    slow, fast = envs("--delay", "60"), envs()
    run = train_run(short_config(tmp_path, tiny_model, [slow.url, fast.url], steps=1,
                                 rollout={"deadline_s": DEADLINE_S}))
    assert run.error is None, run.error
    check_accounting(run)
    rollouts = run.rollouts()
    on_slow = [r for r in rollouts if r["env_url"] == slow.url]
    on_fast = [r for r in rollouts if r["env_url"] == fast.url]
    assert on_slow and on_fast
    assert all(r["status"]["code"] == 4 for r in on_slow)  # DEADLINE_EXCEEDED, cancelled
    assert all(r["reward"] is not None for r in on_fast)
    assert run.failures() == {"deadline_exceeded": len(on_slow)}
    for m in run.metrics:
        assert m["time/step"] < DEADLINE_S + 4.0, m["time/step"]  # not the slow env's 60 s
        assert m["groups/trained"] + m["groups/all_equal"] >= 1
    assert slow.in_flight() == 0  # the slow env was told to stop (POST /cancel)


def test_frozen_env_is_taken_out_of_rotation(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    """The slowest env of all: SIGSTOPped mid-run, its sockets open but nothing answers, not even
    /cancel. Its rollouts end at the deadline; since it did not answer the cancel either, it is
    skipped from then on, and the next step runs entirely on the live env, at full speed."""
    import os
    import signal

    from tests.faults.harness import start_run, wait_until

    frozen, live = envs("--delay", "0.5"), envs()
    thread, run = start_run(short_config(tmp_path, tiny_model, [frozen.url, live.url], steps=2,
                                         rollout={"deadline_s": DEADLINE_S}))
    try:
        wait_until(lambda: frozen.in_flight() >= 1, 60, "rollouts on the env to freeze")
        assert frozen.proc is not None
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        thread.join(60)
    finally:
        if frozen.proc is not None:
            os.kill(frozen.proc.pid, signal.SIGCONT)
    assert not thread.is_alive() and run.error is None, run.error
    check_accounting(run)
    step1, step2 = run.dump(1), run.dump(2)
    assert {r["env_url"] for r in step1 if r["status"]["code"] == 4} == {frozen.url}
    assert all(r["env_url"] == live.url and r["reward"] is not None for r in step2)  # out of rotation
    assert run.metrics[0]["time/step"] < DEADLINE_S + 5.0  # the deadline, the unanswered cancel's 2 s, slack
    assert run.metrics[1]["time/step"] < DEADLINE_S + 1.5  # waiting there again would cost deadline + 2 s
