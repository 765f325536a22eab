"""Fault 3: the env answers 500, then recovers. The client's own retries absorb short bursts; a
rollout whose /init keeps failing past them is retried by the scheduler under a fresh id, and a
batched status poll that fails is retried for every rollout it covered. Nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import check_accounting, short_config, train_run


@pytest.mark.parametrize(("fault", "match", "times"), [
    # one rollout's first attempt (not its retry, id suffix .1) gets 4 = the client's every try
    ("init_500", r"^s1-g0-r0-\w+$", 4),
    ("status_500", r"^s1-g0-r0-\w+$", 4),  # its poll fails: every rollout in that poll is retried
])
def test_500_then_recovers(tmp_path: Path, tiny_model: Path, envs: Any, fault: str, match: str, times: int) -> None:
    env = envs("--fault", fault, "--match", match, "--times", str(times))
    run = train_run(short_config(tmp_path, tiny_model, [env.url]))
    assert run.error is None, run.error
    check_accounting(run)
    events = env.events()
    assert sum(len(v) for v in events["injected"].values()) == times  # every injected 500 happened
    metrics = run.metrics
    assert metrics[0]["rollouts/retries"] >= 1 and metrics[1]["rollouts/retries"] == 0
    assert all(m["rollouts/failed"] == 0 for m in metrics), run.failures()  # recovered: nothing failed
    retried = [r for r in run.dump(1) if r["attempts"] > 1]
    assert retried and all(r["rollout_id"].endswith(".1") for r in retried)
