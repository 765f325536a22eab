"""Fault 6: the same /init arrives twice -- the env started the rollout but its answer was lost (a
500 after the start), so the client sent the request again. /init is idempotent on the rollout id:
one rollout runs, its model call is recorded once, and it is trained on once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.faults.harness import check_accounting, short_config, train_run


def test_repeated_init_starts_one_rollout(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    env = envs("--fault", "lost_reply", "--match=^s1-", "--per-rollout", "1")  # each of step 1 loses its first answer
    run = train_run(short_config(tmp_path, tiny_model, [env.url]))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {} and all(m["rollouts/retries"] == 0 for m in run.metrics)
    events = env.events()
    step1 = [r["rollout_id"] for r in run.dump(1)]
    for rid in step1:
        assert [code for _, code in events["inits"][rid]] == [500, 200]  # sent twice; the second: "already started"
        assert events["starts"][rid] == 1  # ... but the agent ran once
    for r in run.dump(1):
        assert r["num_calls"] == 1 and r["metrics"]["starts"] == 1.0 and r["attempts"] == 1
    assert all(events["starts"][r["rollout_id"]] == 1 for r in run.dump(2))
