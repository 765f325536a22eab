"""An env server written from SPEC §4's two required endpoints alone (plain FastAPI: `POST /init`
and `GET /status`, no /health, /status/batch, /cancel or /version) trains with `wait: auto`: its
first /status answer marks it as polled (per rollout, since it has no batch form), and every
rollout ends by its own status, long before the deadline."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI, HTTPException

from tests.helpers import serve_app


class TwoEndpointEnv:
    """One model call per rollout; reward = fraction of vowels in the answer (groups rarely tie)."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.results: dict[str, dict[str, Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.requests: list[str] = []
        self.app.post("/init")(self.init)
        self.app.get("/status")(self.status)

        @self.app.middleware("http")
        async def seen(request: Any, call_next: Any) -> Any:
            self.requests.append(f"{request.method} {request.url.path}")
            return await call_next(request)

    async def init(self, body: dict[str, Any]) -> dict[str, str]:
        rid = body["metadata"]["rollout_id"]
        if rid not in self.results:
            self.results[rid] = {"terminated": False, "status": {"code": 101, "message": "running"}, "info": {}}
            task = asyncio.create_task(self.run(rid, body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return {"status": "accepted", "rollout_id": rid}

    async def run(self, rid: str, body: dict[str, Any]) -> None:
        client = openai.AsyncOpenAI(base_url=body["model_base_url"], api_key=body["api_key"], max_retries=0)
        params = body["completion_params"]
        reply = await client.chat.completions.create(messages=body["messages"], model=params["model"],
                                                     max_tokens=params["max_tokens"])
        await client.close()
        text = reply.choices[0].message.content or ""
        self.results[rid] = {"terminated": True, "status": {"code": 100, "message": "finished"}, "info": {},
                             "reward": sum(c in "aeiou" for c in text) / max(1, len(text))}

    async def status(self, rollout_id: str) -> dict[str, Any]:
        if rollout_id not in self.results:
            raise HTTPException(404, "unknown rollout")
        return self.results[rollout_id]


def test_two_endpoint_server_trains_with_wait_auto(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from trainer.config import TrainConfig
    from trainer.models import build_tiny_model
    from trainer.commands.train import train

    model_dir = build_tiny_model(tmp_path / "model")
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something about {i}"}]})
                               + "\n" for i in range(4)))
    env = TwoEndpointEnv()
    started = time.monotonic()
    with serve_app(env.app) as env_url:
        config = TrainConfig.model_validate({
            "model": str(model_dir), "dataset": str(dataset), "envs": [{"url": env_url}],
            "steps": 2, "tasks_per_step": 2, "group_size": 2, "sampling": {"max_tokens": 8},
            "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "rollout": {"deadline_s": 60, "max_retries": 0}, "seed": 3,
            "run_dir": str(tmp_path / "run"), "progress": False,
        })
        run_dir = train(config)
    assert time.monotonic() - started < 50  # no rollout waited out its 60 s deadline
    assert not any("/logs pushes" in r.getMessage() for r in caplog.records)

    rows = [json.loads(line) for step in (1, 2) for line in (run_dir / "rollouts" / f"step_{step:06d}.jsonl").open()]
    assert len(rows) == 8 and {r["rollout_id"] for r in rows} == set(env.results)
    for row in rows:  # each ended by the env's own /status, with the env's reward
        assert row["status"] == {"code": 100, "message": "finished"}, row
        assert row["reward"] == env.results[row["rollout_id"]]["reward"]
    # per-rollout GET /status after the batch form answered 404 once; nothing else but /init
    assert {r for r in env.requests} <= {"GET /health", "GET /status", "POST /status/batch", "POST /init",
                                         "GET /version", "POST /init/batch"}
    assert env.requests.count("POST /status/batch") <= 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["rollouts/failed"] == 0 for m in metrics)
    assert sum(m["groups/trained"] for m in metrics) > 0
