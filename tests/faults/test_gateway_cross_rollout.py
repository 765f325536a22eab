"""Fault 9: an env calls the gateway as another rollout -- that rollout's URL with its own key, its
own URL with the other's key -- and pushes a "finished" /logs record naming another rollout. Every
foreign call is refused, nothing lands in another rollout's record, and no rollout is ended by
someone else's push: each is trained on its own single call, with the reward its own env reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.faults.harness import check_accounting, short_config, train_run


def test_foreign_calls_are_refused(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    # every rollout of step 1 whose id ends in r1..r3 misbehaves once, before its own call
    env = envs("--fault", "cross", r"--match=^s1-g\d-r[123]-", "--per-rollout", "1", "--delay", "0.3")
    run = train_run(short_config(tmp_path, tiny_model, [env.url]))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {}
    cross = env.events()["cross"]
    assert len(cross) == 6
    for rid, counts in cross.items():
        assert counts["tries"] >= 2 and counts["accepted"] == 0 and counts["refused"] == counts["tries"], (rid, counts)
    pushes = [c["logs_status"] for c in cross.values()]  # my key, another's rollout: refused (404 if it ended)
    assert 403 in pushes and set(pushes) <= {403, 404}, pushes
    for r in run.rollouts():  # no rollout was ended by another's push; each record holds its own call only
        assert r["num_calls"] == 1 and not r["prefix_mismatch"], r
        assert r["termination_reason"] == "stop" and r["reward"] is not None  # ended by its own env
