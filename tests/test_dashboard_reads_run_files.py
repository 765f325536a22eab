"""The dashboard's reads over real HTTP (uvicorn on loopback), from run directories written by hand
in the trainer's formats: a folder of two runs, a half-written last line (a live or killed trainer),
new metric rows only with `since`, failure kinds, tool calls, the token dump read back exactly, and
bad ids answered 404. The page itself is tested in Chromium (tests/test_dashboard_browser.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port
from trainer.commands.dashboard import serve_in_thread
from trainer.dashboard.tokens import write_tokens
from trainer.types import Sample


def _write_run(run: Path, steps: int, *, torn: bool = False) -> None:
    (run / "rollouts").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {run / 'no-model'}\n")
    lines = "".join(json.dumps({"step": s, "reward/mean": s / 10, "loss": float("nan") if s == 2 else 0.1}) + "\n"
                    for s in range(1, steps + 1))
    (run / "metrics.jsonl").write_text(lines + ('{"step": 99, "rew' if torn else ""))
    rollouts = [
        {"step": steps, "rollout_id": "ok", "group": 0, "reward": 1.0, "status": {"code": 100, "message": ""},
         "trained": True, "messages": [
             {"role": "user", "content": "2+3?"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "5"},
             {"role": "assistant", "content": "5"}]},
        {"step": steps, "rollout_id": "late", "group": 0, "reward": None, "status": {"code": 4, "message": "deadline"},
         "trained": False, "messages": []},
    ]
    (run / "rollouts" / f"step_{steps:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    write_tokens(run, steps, [Sample(input_ids=[5, 6, 7, 8, 9], loss_mask=[0, 1, 1, 0, 1],
                                     old_logprobs=[0.0, -0.5, -0.25, 0.0, -1.123456], advantage=0.5, rollout_id="ok")])


@pytest.fixture()
def dashboard(tmp_path: Path) -> Any:
    _write_run(tmp_path / "runs" / "a", 3, torn=True)
    _write_run(tmp_path / "runs" / "sweep" / "b", 2)
    (tmp_path / "runs" / "a" / "eval_after.json").write_text(json.dumps({"mean_reward": 0.75, "pass_at_k": {"1": 0.5}}))
    with serve_in_thread(tmp_path / "runs", port=free_port()) as url, httpx.Client(base_url=url) as client:
        yield client


def test_runs_metrics_rollouts_tokens_and_evals(dashboard: httpx.Client) -> None:
    runs = dashboard.get("/api/runs").json()
    assert [r["id"] for r in runs] == ["a", "sweep/b"]

    first = dashboard.get("/api/metrics", params={"run": "a"}).json()
    assert first["total"] == 3  # the half-written 4th line waits for its newline
    assert [r["step"] for r in first["rows"]] == [1, 2, 3]
    assert first["rows"][1]["loss"] is None  # NaN is not JSON: a gap in the curve
    assert dashboard.get("/api/metrics", params={"run": "a", "since": 2}).json()["rows"] == [
        {"step": 3, "reward/mean": 0.3, "loss": 0.1}]

    assert dashboard.get("/api/steps", params={"run": "sweep/b"}).json() == [2]
    listing = {r["rollout_id"]: r for r in dashboard.get("/api/rollouts", params={"run": "a", "step": 3}).json()}
    assert listing["ok"]["failure"] is None and listing["ok"]["tool_calls"] == 1 and listing["ok"]["turns"] == 4
    assert listing["late"]["failure"] == "deadline_exceeded"

    rollout = dashboard.get("/api/rollout", params={"run": "a", "step": 3, "id": "ok"}).json()
    assert [m["role"] for m in rollout["messages"]] == ["user", "assistant", "tool", "assistant"]
    (sample,) = rollout["samples"]
    assert sample["ids"] == [5, 6, 7, 8, 9] and sample["mask"] == [0, 1, 1, 0, 1]
    assert sample["logprobs"] == [None, -0.5, -0.25, None, -1.1235] and sample["advantage"] == 0.5
    assert sample["pieces"] is None  # no tokenizer on disk for this run: the page shows ids

    (evaluation,) = dashboard.get("/api/evals", params={"run": "a"}).json()
    assert evaluation == {"name": "eval_after.json", "data": {"mean_reward": 0.75, "pass_at_k": {"1": 0.5}}}

    page = dashboard.get("/")
    assert page.status_code == 200 and "/static/vendor/uplot/uPlot.iife.min.js" in page.text
    assert dashboard.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
    assert dashboard.get("/static/vendor/uplot/LICENSE").status_code == 200


@pytest.mark.parametrize("path, params", [
    ("/api/metrics", {"run": "../.."}),
    ("/api/metrics", {"run": "nope"}),
    ("/api/rollouts", {"run": "a", "step": 7}),
    ("/api/rollout", {"run": "a", "step": 3, "id": "nope"}),
])
def test_unknown_runs_steps_and_rollouts_are_404(dashboard: httpx.Client, path: str, params: dict[str, Any]) -> None:
    response = dashboard.get(path, params=params)
    assert response.status_code == 404
    assert response.json()["detail"].startswith(("no run", "run 'a'"))
