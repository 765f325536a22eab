"""Fault 2: the env hangs past the rollout deadline -- its agent never returns (and it ignores the
deadline it was given), or its /init is never answered. The trainer stops waiting at its own
deadline, cancels the rollout on the env, counts it as deadline_exceeded, and the step goes on with
the other rollouts: it is not held hostage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.harness import check_accounting, short_config, train_run

# hang_init: the hung /init/batch delays the group's other inits by INIT_BATCH_TIMEOUT_S (2 s) before they go
# alone, so the deadline leaves those rollouts a few seconds to generate, even on a loaded machine.
DEADLINE_S = 6.0


@pytest.mark.parametrize("fault", ["hang", "hang_init"])
def test_hung_rollouts_end_at_the_deadline(tmp_path: Path, tiny_model: Path, envs: Any, fault: str) -> None:
    env = envs("--fault", fault, "--match=-r0-")  # one rollout of every group hangs
    run = train_run(short_config(tmp_path, tiny_model, [env.url], steps=1, rollout={"deadline_s": DEADLINE_S}))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {"deadline_exceeded": 2}  # one per group, nothing else failed
    for m in run.metrics:
        # no group was dropped: the 3 other rollouts of each group were kept (and trained on unless
        # their sampled rewards happened to be all equal, which check_accounting verifies)
        assert m["groups/dropped"] == 0 and m["groups/trained"] + m["groups/all_equal"] == 2, m
        assert DEADLINE_S - 0.5 < m["time/step"] < DEADLINE_S + 4.0, m["time/step"]
    hung = [r for r in run.rollouts() if r["status"]["code"] == 4]
    assert all("-r0-" in r["rollout_id"] and r["attempts"] == 1 for r in hung)  # a deadline is not retried
    assert all(f"{DEADLINE_S:g}s" in r["status"]["message"] for r in hung)
    if fault == "hang":  # the trainer cancelled them on the env: no agent is left running there
        for r in hung:
            st = httpx.get(f"{env.url}/status", params={"rollout_id": r["rollout_id"]}).json()
            assert st["status"]["code"] == 1, st  # CANCELLED
        assert env.in_flight() == 0
