"""Fault 5: the env reports a reward that is NaN, outside [0, 1], missing, or not a number. Each
such rollout fails alone -- score_invalid for a bad or missing score (never clamped, never read as
0), data_loss for a reward that is not a number at all (the status breaks the schema) -- and is not
trained on; the group's good rollouts are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.faults.harness import check_accounting, short_config, train_run


def test_bad_rewards_fail_their_rollout_only(tmp_path: Path, tiny_model: Path, envs: Any) -> None:
    # in each group of 7: k=0 NaN, 1 1.5, 2 -0.25, 3 no reward, 4 "high"; k=5, 6 report true rewards
    env = envs("--fault", "bad_rewards")
    run = train_run(short_config(tmp_path, tiny_model, [env.url], steps=1, group_size=7))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {"score_invalid": 8, "data_loss": 2}
    by_k = {int(r["rollout_id"].split("-r")[1].split("-")[0]): r for r in run.dump(1) if r["group"] == 0}
    assert "nan" in by_k[0]["status"]["message"].lower()
    assert "1.5" in by_k[1]["status"]["message"] and "-0.25" in by_k[2]["status"]["message"]
    assert "no score" in by_k[3]["status"]["message"]
    assert by_k[4]["status"]["code"] == 15 and "reward" in by_k[4]["status"]["message"]
    for k in range(5):
        assert by_k[k]["reward"] is None and by_k[k]["attempts"] == 1
    assert all(by_k[k]["reward"] is not None for k in (5, 6))
    [(groups, batch)] = run.steps
    assert {s.rollout_id for s in batch.samples} <= {r.rollout_id for g in groups for r in g.rollouts
                                                      if "-r5-" in r.rollout_id or "-r6-" in r.rollout_id}
