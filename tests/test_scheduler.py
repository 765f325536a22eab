"""Rollout scheduler and rewards over real HTTP: env servers on loopback (env_sdk ones, plus two
small protocol-level fakes for failures an SDK server does not produce on demand), the model
either a scripted OpenAI-compatible server or the trainer's gateway."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from env_sdk import AgentResult, EvaluationResult, RolloutTask, StatusCode, Task, create_env_app
from tests.helpers import free_port, scripted_model_app, serve_app
from trainer.config import EnvEndpoint, TrainConfig
from trainer.rollouts.rewards import EvaluatorLoadError, ScoreInvalid, load_evaluator, score_rollout
from trainer.learning.batch import build_batch
from trainer.rollouts import EnvPool, EnvsUnreachable, ExternalEndpoint, GatewayEndpoint, RolloutScheduler
from trainer.types import failure_counts, GroupResult, RolloutResult
from env_sdk.models import Status

SECRET = "ground-truth-never-leaves-the-trainer"


async def behaving_agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult | float | None:
    """What the rollout does depends on the user message."""
    what = task.messages[-1]["content"]
    if what == "hang":
        await asyncio.sleep(3600)
    if what == "crash":
        raise RuntimeError("the agent fell over")
    reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
    text = reply.choices[0].message.content or ""
    if what == "nan":
        return AgentResult(reward=math.nan)
    if what == "no-reward":
        return None
    return AgentResult(reward=1.0 if "yes" in text else 0.0, info={"answer": text},
                       messages=list(task.messages) + [{"role": "assistant", "content": text}])


def task(content: str, ground_truth: Any = None) -> Task:
    return Task(messages=[{"role": "user", "content": content}], ground_truth=ground_truth)


def scheduler_for(urls: list[str], model_url: str, *, evaluator: Any = None, deadline_s: float = 30.0,
                  max_retries: int = 2, routing: str = "least_loaded") -> RolloutScheduler:
    pool = EnvPool([EnvEndpoint(url=u) for u in urls], routing=routing, poll_s=1.0)
    return RolloutScheduler(pool, ExternalEndpoint(model_url, "sk-test"), completion_params={"model": "policy"},
                            evaluator=evaluator, deadline_s=deadline_s, max_retries=max_retries,
                            max_in_flight=64, run_id="run1")


@pytest.fixture(scope="module")
def model_url() -> Any:
    with serve_app(scripted_model_app(lambda messages, tools: "yes, certainly")) as url:
        yield url


@pytest.fixture(scope="module")
def env() -> Any:
    app = create_env_app(behaving_agent)
    app.state.inits = []

    @app.middleware("http")
    async def keep_init_bodies(request: Request, call_next: Any) -> Any:
        if request.url.path == "/init":
            app.state.inits.append(await request.body())
        elif request.url.path == "/init/batch":  # the inits of a group, sent together
            app.state.inits += [json.dumps(item).encode() for item in json.loads(await request.body())["requests"]]
        return await call_next(request)

    with serve_app(app) as url:
        yield url, app


async def test_groups_finish_and_failures_are_counted_by_kind(env: Any, model_url: str) -> None:
    url, _ = env
    sched = scheduler_for([url], model_url, deadline_s=4.0)  # roomy: a busy CI box is slow
    await sched.pool.probe()
    started = time.monotonic()
    groups = await sched.run_groups([(0, task("hi")), (1, task("crash")), (2, task("nan")), (3, task("no-reward")),
                                     (4, task("hang"))], group_size=2, step=1)
    elapsed = time.monotonic() - started
    await sched.pool.aclose()
    assert [g.task_index for g in groups] == [0, 1, 2, 3, 4] and all(len(g.rollouts) == 2 for g in groups)
    assert [r.reward for r in groups[0].rollouts] == [1.0, 1.0] and groups[0].rollouts[0].messages[-1]["content"] == "yes, certainly"
    assert failure_counts(groups) == {"internal": 2, "score_invalid": 4, "deadline_exceeded": 2}
    assert "the agent fell over" in groups[1].rollouts[0].status.message
    assert "no score" in groups[3].rollouts[0].status.message  # no env reward, no evaluator: never a silent 0
    assert groups[4].rollouts[0].attempts == 1  # a deadline is not retried
    assert elapsed < 15, f"a hanging env held the step {elapsed:.1f}s, past its 4 s deadline"
    assert sched.retries == 0


async def test_trainer_side_evaluator_sees_ground_truth_the_env_never_does(env: Any, model_url: str) -> None:
    url, app = env
    seen: list[tuple[list[dict], Any, dict]] = []

    def evaluate(messages: list[dict], ground_truth: Any, info: dict) -> EvaluationResult:
        seen.append((messages, ground_truth, info))
        return EvaluationResult(score=0.25, reason="partial", metrics={"len": 3.0})

    sched = scheduler_for([url], model_url, evaluator=evaluate)
    [group] = await sched.run_groups([(7, task("hi", ground_truth=SECRET))], group_size=2, step=3)
    await sched.pool.aclose()
    assert [r.reward for r in group.rollouts] == [0.25, 0.25] and group.rollouts[0].reason == "partial"
    assert group.rollouts[0].metrics["len"] == 3.0
    messages, truth, info = seen[0]
    assert truth == SECRET and info == {"answer": "yes, certainly"} and messages[-1]["role"] == "assistant"
    assert app.state.inits and not any(SECRET.encode() in body for body in app.state.inits)
    body = json.loads(app.state.inits[-1])
    assert body["metadata"]["row_id"] == "7" and body["model_base_url"] == model_url and body["api_key"] == "sk-test"


@pytest.mark.parametrize(
    ("returned", "needle"),
    [(1.5, "outside [0, 1]"), (math.nan, "outside [0, 1]"), (None, "no score"), ("0.5", "not a score"),
     (True, "not a score")],
)
async def test_invalid_scores_are_never_clamped(returned: Any, needle: str) -> None:
    with pytest.raises(ScoreInvalid, match=needle.replace("[", r"\[").replace("]", r"\]")):
        await score_rollout(lambda m, g, i: returned, [], None, {}, None)
    with pytest.raises(ScoreInvalid, match="evaluator raised ValidationError"):
        await score_rollout(lambda m, g, i: EvaluationResult(score=2.0), [], None, {}, None)

    async def async_eval(m: Any, g: Any, i: Any) -> float:
        return 0.5

    assert (await score_rollout(async_eval, [], None, {}, 0.9)).reward == 0.5
    assert (await score_rollout(None, [], None, {}, 0.9)).reward == 0.9


def test_load_evaluator() -> None:
    fn = load_evaluator("math:fabs")
    assert fn(-2) == 2
    with pytest.raises(EvaluatorLoadError, match="module:function"):
        load_evaluator("nocolon")
    with pytest.raises(EvaluatorLoadError, match="cannot import 'no_such_module_x'"):
        load_evaluator("no_such_module_x:f")
    with pytest.raises(EvaluatorLoadError, match="has no attribute 'nope'"):
        load_evaluator("math:nope")


def test_evaluator_next_to_the_config_is_found(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`openrft` is a console script: the working directory is not on sys.path by itself."""
    import sys

    (tmp_path / "user_evaluator_xyz.py").write_text("def score(messages, truth, info):\n    return 0.75\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_evaluator("user_evaluator_xyz:score")([], None, {}) == 0.75


def capacity_env() -> FastAPI:
    """Always at capacity: 429 with Retry-After 0 on /init."""
    app = FastAPI()
    app.state.inits = 0

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "protocol_version": "1", "capacity": 0, "in_flight": 0, "available": 0}

    @app.post("/init")
    async def init() -> JSONResponse:
        app.state.inits += 1
        return JSONResponse({"detail": "busy"}, status_code=429, headers={"Retry-After": "0"})

    return app


def amnesiac_env() -> FastAPI:
    """Accepts every rollout, then forgets it (as a restarted server would)."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "protocol_version": "1", "capacity": 10, "in_flight": 0, "available": 10}

    @app.post("/init", status_code=202)
    async def init(request: Request) -> dict:
        body = await request.json()
        return {"status": "accepted", "rollout_id": body["metadata"]["rollout_id"]}

    @app.post("/status/batch")
    async def batch(request: Request) -> dict:
        return {"statuses": {}, "unknown": (await request.json())["rollout_ids"]}

    @app.post("/cancel")
    async def cancel(rollout_id: str) -> dict:
        return {"rollout_id": rollout_id, "cancelled": False}

    return app


async def test_retryable_failures_go_to_another_env(env: Any, model_url: str) -> None:
    url, _ = env
    busy = capacity_env()
    with serve_app(busy) as busy_url:
        sched = scheduler_for([busy_url, url], model_url, routing="round_robin")
        groups = await sched.run_groups([(0, task("hi")), (1, task("hi"))], group_size=2, step=1)
        await sched.pool.aclose()
    rollouts = [r for g in groups for r in g.rollouts]
    assert all(r.ok for r in rollouts) and all(r.env_url == url for r in rollouts)
    assert sched.retries == 2 and sorted(r.attempts for r in rollouts) == [1, 1, 2, 2]
    assert busy.state.inits >= 2 * 4  # each refused attempt was retried inside the client first
    assert any(r.rollout_id.endswith(".1") for r in rollouts)  # a retry is a fresh rollout id


async def test_retries_are_bounded(model_url: str) -> None:
    with serve_app(amnesiac_env()) as url:
        sched = scheduler_for([url], model_url, max_retries=2)
        [group] = await sched.run_groups([(0, task("hi"))], group_size=1, step=1)
        await sched.pool.aclose()
    [r] = group.rollouts
    assert r.status.code == StatusCode.NOT_FOUND and r.attempts == 3 and sched.retries == 2


async def test_down_env_is_skipped_and_all_down_fails_fast(env: Any, model_url: str) -> None:
    url, _ = env
    dead = f"http://127.0.0.1:{free_port()}"
    sched = scheduler_for([dead, url], model_url)
    warnings = await sched.pool.probe()
    assert len(warnings) == 1 and dead in warnings[0]
    groups = await sched.run_groups([(0, task("hi"))], group_size=4, step=1)
    await sched.pool.aclose()
    assert all(r.ok and r.env_url == url for r in groups[0].rollouts)

    pool = EnvPool([EnvEndpoint(url=dead)])
    started = time.monotonic()
    with pytest.raises(EnvsUnreachable, match=dead):
        await pool.probe()
    assert time.monotonic() - started < 10
    await pool.aclose()


async def test_eval_protocol_env_finishes_by_logs_push() -> None:
    """An env with only POST /init (no /health, no /status) that reports completion the way
    eval-protocol servers do: a status log record POSTed to the gateway's /logs."""
    from trainer.generation import ScriptedBackend
    from trainer.gateway import Gateway
    from trainer.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    gateway = Gateway(ScriptedBackend(tok, lambda ids, params: "pushed answer"), tok)
    env = FastAPI()
    background: set[asyncio.Task] = set()

    async def work(body: dict) -> None:
        client = openai.AsyncOpenAI(base_url=body["model_base_url"], api_key=body["api_key"])
        await client.chat.completions.create(model="policy", messages=body["messages"])
        origin = body["model_base_url"].split("/v1/")[0]
        async with httpx.AsyncClient() as http:
            await http.post(f"{origin}/logs", json={
                "program": "eval_protocol", "message": "done", "tags": [f"rollout_id:{body['metadata']['rollout_id']}"],
                "status": {"code": 100, "message": "Rollout finished", "details": []}})

    @env.post("/init")
    async def init(request: Request) -> JSONResponse:
        t = asyncio.create_task(work(await request.json()))
        background.add(t)
        return JSONResponse({}, status_code=200)

    def evaluate(messages: list[dict], ground_truth: Any, info: dict) -> float:
        return 1.0 if messages[-1]["content"] == "pushed answer" else 0.0

    with serve_app(env) as env_url, serve_app(gateway.app) as gw_url:
        pool = EnvPool([EnvEndpoint(url=env_url)], poll_s=1.0)
        assert await pool.probe() == [] and pool.slots[0].wait == "undecided"  # no /health
        sched = RolloutScheduler(pool, GatewayEndpoint(gateway, gw_url), completion_params={"model": "policy"},
                                 evaluator=evaluate, deadline_s=20, max_retries=0, max_in_flight=8, run_id="r")
        [group] = await sched.run_groups([(0, task("hi"))], group_size=3, step=1)
        await pool.aclose()
    assert pool.slots[0].wait == "logs"  # its /status answered 404
    assert [r.reward for r in group.rollouts] == [1.0, 1.0, 1.0]
    assert all(len(r.calls) == 1 and r.calls[0].completion_ids for r in group.rollouts)


def test_build_batch_drops_small_groups_and_skips_ties() -> None:
    config = TrainConfig(model="m", dataset="d", envs=[{"url": "u"}], group_size=4,
                         rollout={"min_group_size": 3}, grpo={"scale_rewards": "none"})

    class Call:
        def __init__(self, n: int) -> None:
            self.prompt_ids, self.completion_ids, self.logprobs = [1, 2], [3] * n, [-1.0] * n

    def rollout(rid: str, reward: float | None, code: int = 100) -> RolloutResult:
        return RolloutResult(rid, 0, 0, Status(code=code), reward=reward, calls=[Call(2)])

    groups = [
        GroupResult(0, 0, [rollout("a", 1.0), rollout("b", 0.0), rollout("c", 0.0), rollout("d", None, 13)]),
        GroupResult(1, 1, [rollout("e", 1.0), rollout("f", None, 4), rollout("g", None, 4), rollout("h", 0.0)]),
        GroupResult(2, 2, [rollout("i", 0.5)] * 4),
    ]
    batch = build_batch(groups, config)
    assert (batch.trained_groups, batch.dropped, batch.all_equal) == (1, 1, 1)
    assert [(s.rollout_id, round(s.advantage, 4)) for s in batch.samples] == [("a", 0.6667), ("b", -0.3333), ("c", -0.3333)]
    assert failure_counts(groups) == {"internal": 1, "deadline_exceeded": 2}


async def test_a_rollout_the_trainer_gives_up_is_cancelled_on_the_env(env: Any, model_url: str) -> None:
    """A pipelined step cancels groups that could only be trained too stale; their rollouts must end on the
    env too, or they hold its slots (the math env answered 429 "at capacity" in a dynamic-sampling run)."""
    url, app = env
    sched = scheduler_for([url], model_url)
    app.state.inits.clear()
    job = asyncio.ensure_future(sched.run_groups([(0, task("hang"))], group_size=2, step=1))
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(200):  # until the env has accepted both rollouts
            await asyncio.sleep(0.05)
            ids = [json.loads(body)["metadata"]["rollout_id"] for body in app.state.inits]
            if len(ids) == 2 and [(await client.get("/status", params={"rollout_id": i})).status_code
                                  for i in ids] == [200, 200]:
                break
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        codes = [(await client.get("/status", params={"rollout_id": i})).json()["status"]["code"] for i in ids]
    await sched.pool.aclose()
    assert codes == [StatusCode.CANCELLED, StatusCode.CANCELLED]
