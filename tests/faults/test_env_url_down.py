"""Fault 8: one of several env URLs is down for the whole run. The start-up probe names it and the
run goes on without it: every rollout runs on the others, none fails, none waits on the dead one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import check_accounting, short_config, train_run
from tests.helpers import free_port


def test_traffic_goes_to_the_live_envs(tmp_path: Path, tiny_model: Path, envs: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    a, b = envs(), envs()
    with caplog.at_level(logging.WARNING, logger="trainer.commands.train"):
        run = train_run(short_config(tmp_path, tiny_model, [dead, a.url, b.url], steps=2))
    assert run.error is None, run.error
    check_accounting(run)
    assert run.failures() == {} and all(m["rollouts/retries"] == 0 for m in run.metrics)
    used = {r["env_url"] for r in run.rollouts()}
    assert used == {a.url, b.url}  # both live envs share the load; the dead one gets nothing
    assert any(dead in rec.getMessage() and "unreachable" in rec.getMessage() for rec in caplog.records)
    assert all(m["time/step"] < 5.0 for m in run.metrics)
