"""Fault 4: the env answers malformed JSON, or a status that violates the spec. A garbled batch
answer costs nothing: the trainer asks for each rollout alone and keeps every finished one. A
rollout whose own status stays garbled or off-spec fails alone as data_loss (not retried: the env
said something, just nothing usable), and its env is not taken out of rotation for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import check_accounting, short_config, train_run

ONE = r"^s1-g0-r0-\w+$"  # the first rollout of step 1, first attempt


@pytest.mark.parametrize(("fault", "times", "failures"), [
    ("malformed", ["--times", "1"], {}),  # one garbled batch answer: everything recovers
    ("malformed", [], {"data_loss": 1}),  # that rollout's answer is always garbled
    ("spec", [], {"data_loss": 1}),       # that rollout's status breaks the schema's types
])
def test_malformed_answers(tmp_path: Path, tiny_model: Path, envs: Any, fault: str, times: list[str],
                           failures: dict[str, int]) -> None:
    bad = envs("--fault", fault, f"--match={ONE}", *times)
    good = envs()
    run = train_run(short_config(tmp_path, tiny_model, [bad.url, good.url]))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == failures
    assert bad.events()["injected"], "the fault never fired"
    assert all(m["rollouts/retries"] == 0 for m in run.metrics)
    lost = [r for r in run.rollouts() if r["status"]["code"] == 15]
    for r in lost:
        assert r["env_url"] == bad.url and "valid StatusResponse" in r["status"]["message"] or "JSON" in r["status"]["message"]
    # the env with one bad rollout stays in rotation: step 2 still uses both envs
    assert {r["env_url"] for r in run.dump(2)} == {bad.url, good.url}
