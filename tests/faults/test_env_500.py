"""Fault 3: the env answers 500, then recovers. The client's own retries absorb short bursts. A
rollout whose /init keeps failing past them is retried by the scheduler under a fresh id; a batched
status poll that keeps failing is answered rollout by rollout instead, so the rollouts it covered
(finished or running on a live env) are not thrown away. Nothing fails, nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import check_accounting, short_config, train_run

ONE = r"^s1-g0-r0-\w+$"  # the first rollout of step 1, first attempt (a retry's id ends in .1)


@pytest.mark.parametrize(("fault", "retries"), [("init_500", 1), ("status_500", 0)])
def test_500_then_recovers(tmp_path: Path, tiny_model: Path, envs: Any, fault: str, retries: int) -> None:
    env = envs("--fault", fault, f"--match={ONE}", "--times", "4")  # 4 = the client's every try
    run = train_run(short_config(tmp_path, tiny_model, [env.url]))
    assert run.error is None, run.error
    check_accounting(run)
    assert sum(len(v) for v in env.events()["injected"].values()) == 4  # every injected 500 happened
    assert all(m["rollouts/failed"] == 0 for m in run.metrics), run.failures()  # recovered: nothing failed
    assert [m["rollouts/retries"] for m in run.metrics] == [retries, 0]
    assert run.metrics[0].get("retries/unavailable", 0) == retries  # a 5xx is retried as "unavailable"
    retried = [r for r in run.dump(1) if r["attempts"] > 1]
    assert [r["rollout_id"].endswith(".1") for r in retried] == [True] * retries
