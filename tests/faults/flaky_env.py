"""A controllable protocol-v1 env server for fault injection, run by the tests as a real process:

    python -m tests.faults.flaky_env --port P [--fault KIND] [--match REGEX] [--times N]
                                     [--per-rollout N] [--delay S] [--capacity N] [--token T]

It is `env_sdk.create_env_app` with a one-call agent (reward = the fraction of vowels in the
model's reply, so the rollouts of a group rarely tie), behind an ASGI layer that injects one kind of
fault into what concerns the rollouts whose id matches --match (all by default), for the first
--times such occasions (all by default), at most --per-rollout times for one rollout id.
`GET /_events` (never faulted, no token) reports what the server saw and did, per rollout id: /init
requests and their answers, agent starts, faults injected, and what the gateway answered to the
`cross` agent's foreign calls. The /init faults hit each item of a POST /init/batch as they would
its own /init (the item's result is what that /init answered).

Faults (KIND):
  none            behave (only --delay applies)
  hang            the agent never returns and the env ignores the rollout's deadline
  hang_init       /init is never answered
  init_500        /init answers 500 and starts nothing
  lost_reply      /init starts the rollout, then answers 500 (the client repeats the same /init)
  status_500      /status/batch answers 500 while it lists a matching rollout
  malformed       a /status/batch or /status answer holding a matching terminal rollout is cut
                  short (not JSON)
  spec            a matching rollout's terminal status violates the spec's types (batch and single)
  bad_rewards     a matching rollout reports a bad reward, by its index k in its group
                  (rollout ids `s<step>-g<group>-r<k>-...`): k=0 NaN, 1 1.5, 2 -0.25, 3 none, 4 "high";
                  k >= 5 report their true reward (in /status/batch and /status answers)
  cross           the agent first calls the gateway as other rollouts (their URL with its own key,
                  its URL with their key, a closed rollout), and pushes a FINISHED /logs record
                  naming another rollout; then makes its own call
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import openai
import uvicorn

from env_sdk import AgentResult, RolloutTask, create_env_app

FAULTS = ("none", "hang", "hang_init", "init_500", "lost_reply", "status_500", "malformed", "spec",
          "bad_rewards", "cross")
BAD_REWARDS: dict[int, Any] = {0: "NaN", 1: 1.5, 2: -0.25, 3: None, 4: "high"}
_INDEX = re.compile(r"-r(\d+)-")


class Faults:
    """Which rollouts get the fault, how many more times, and the record of what happened."""

    def __init__(self, kind: str, match: str, times: int | None, delay_s: float, per_rollout: int | None = None) -> None:
        self.kind, self.match, self.left, self.delay_s = kind, re.compile(match), times, delay_s
        self.per_rollout = per_rollout
        self.inits: dict[str, list[tuple[float, int]]] = defaultdict(list)  # rid -> (time, answer code)
        self.starts: dict[str, int] = defaultdict(int)
        self.injected: dict[str, list[str]] = defaultdict(list)
        self.cross: dict[str, dict[str, int]] = {}
        self.seen: dict[str, tuple[str, str]] = {}  # rid -> (model_base_url, api_key), for `cross`

    def matches(self, rid: str) -> bool:
        return bool(self.match.search(rid))

    def take(self, kind: str, rid: str) -> bool:
        """Inject `kind` for this rollout now? Counts down --times."""
        if self.kind != kind or not self.matches(rid) or self.left == 0:
            return False
        if self.per_rollout is not None and len(self.injected[rid]) >= self.per_rollout:
            return False
        if self.left is not None:
            self.left -= 1
        self.injected[rid].append(kind)
        return True

    def events(self) -> dict[str, Any]:
        return {"inits": self.inits, "starts": self.starts, "injected": self.injected, "cross": self.cross}


def make_agent(faults: Faults) -> Any:
    async def agent(task: RolloutTask, client: openai.AsyncOpenAI) -> AgentResult:
        rid = task.metadata.rollout_id
        faults.starts[rid] += 1
        if faults.matches(rid) and faults.delay_s:
            await asyncio.sleep(faults.delay_s)
        if faults.take("hang", rid):
            await asyncio.Event().wait()
        metrics: dict[str, float] = {"starts": float(faults.starts[rid])}
        if faults.take("cross", rid):
            faults.cross[rid] = await _cross_calls(faults, rid, str(client.base_url), client.api_key)
            metrics.update({f"cross/{k}": float(v) for k, v in faults.cross[rid].items()})
        reply = await client.chat.completions.create(messages=task.messages, **task.completion_kwargs())
        text = reply.choices[0].message.content or ""
        return AgentResult(reward=sum(c in "aeiou" for c in text) / max(1, len(text)), metrics=metrics,
                           messages=[*task.messages, {"role": "assistant", "content": text}],
                           termination_reason="stop")

    return agent


async def _cross_calls(faults: Faults, rid: str, own_url: str, own_key: str) -> dict[str, int]:
    """Call the gateway as other rollouts; count what was accepted (2xx) and refused (4xx)."""
    others = [(r, u, k) for r, (u, k) in faults.seen.items() if r != rid]
    tries: list[tuple[str, str]] = []  # (url, key): theirs with mine, mine with theirs
    for _, url, key in others[-3:]:
        tries += [(url, own_key), (own_url, key)]
    body = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    counts = {"accepted": 0, "refused": 0, "tries": 0, "logs_status": 0}
    async with httpx.AsyncClient(timeout=30) as http:
        for url, key in tries:
            resp = await http.post(url.rstrip("/") + "/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"})
            counts["tries"] += 1
            counts["accepted" if resp.is_success else "refused"] += 1
        if others:  # an eval-protocol style status push naming the latest other rollout (likely running)
            gateway = own_url.split("/v1/rollout_id/")[0]
            push = {"status": {"code": 100, "message": "finished"}, "tags": [f"rollout_id:{others[-1][0]}"]}
            resp = await http.post(f"{gateway}/logs", json=push, headers={"Authorization": f"Bearer {own_key}"})
            counts["logs_status"] = resp.status_code
    return counts


# --- the fault layer (pure ASGI) ------------------------------------------------------------


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def _recorder() -> tuple[dict[str, Any], list[bytes], Callable[[dict[str, Any]], Awaitable[None]]]:
    """An ASGI `send` that keeps the response's start message and body chunks, for rewriting."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def capture(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))

    return start, chunks, capture


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a disconnect never comes: the request is complete
        return {"type": "http.disconnect"}

    return receive


async def _send_json(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FaultLayer:
    def __init__(self, app: Any, faults: Faults) -> None:
        self.app, self.faults = app, faults

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, f = scope["path"], self.faults
        if path == "/_events":
            await _send_json(send, 200, json.dumps(f.events()).encode())
            return
        if path == "/init" and scope["method"] == "POST":
            await self._init(scope, await _read_body(receive), send)
            return
        if path == "/init/batch" and scope["method"] == "POST":
            await self._init_batch(scope, await _read_body(receive), send)
            return
        if path == "/status/batch" and scope["method"] == "POST":
            await self._batch(scope, await _read_body(receive), send)
            return
        if path == "/status" and scope["method"] == "GET":
            rid = parse_qs(scope.get("query_string", b"").decode()).get("rollout_id", [""])[0]
            await self._rewritten(scope, receive, send, lambda out: self._rewrite_one(rid, out))
            return
        await self.app(scope, receive, send)

    async def _init(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        f = self.faults
        try:
            req = json.loads(body)
            rid = str(req["metadata"]["rollout_id"])
        except (ValueError, KeyError, TypeError):
            await self.app(scope, _replay(body), send)
            return
        answer: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.append(message["status"])
            await send(message)

        if f.take("hang_init", rid):
            f.inits[rid].append((time.time(), 0))
            await asyncio.Event().wait()
        if f.take("init_500", rid):
            f.inits[rid].append((time.time(), 500))
            await _send_json(send, 500, b'{"detail": "injected: internal error"}')
            return
        if req.get("model_base_url") and req.get("api_key"):
            f.seen[rid] = (req["model_base_url"], req["api_key"])
        if f.kind == "hang" and f.matches(rid):
            req.pop("deadline_s", None)  # the server default (an hour) applies: the env hangs
            body = json.dumps(req).encode()
        if f.take("lost_reply", rid):
            async def swallow(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    answer.append(message["status"])

            await self.app(scope, _replay(body), swallow)
            f.inits[rid].append((time.time(), 500))
            await _send_json(send, 500, b'{"detail": "injected: the answer was lost"}')
            return
        await self.app(scope, _replay(body), watch)
        f.inits[rid].append((time.time(), answer[0] if answer else 0))

    async def _init_batch(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        """Each item in turn through `_init`, as its own POST /init (faults and all), its answer
        turned into the item's result: a hung item hangs the batch, a 500 is that item's 500."""
        try:
            items = json.loads(body)["requests"]
        except (ValueError, KeyError, TypeError):
            items = None
        if not isinstance(items, list):
            await self.app(scope, _replay(body), send)
            return
        results = []
        for item in items:
            start, chunks, capture = _recorder()
            await self._init({**scope, "path": "/init", "raw_path": b"/init"}, json.dumps(item).encode(), capture)
            code, answer = start.get("status", 500), json.loads(b"".join(chunks) or b"{}")
            result: dict[str, Any] = {"status_code": code, "rollout_id": answer.get("rollout_id")}
            if code >= 400:
                headers = {k.lower(): v for k, v in start.get("headers", [])}
                retry_after = headers.get(b"retry-after")
                result.update(detail=answer.get("detail", ""), errors=answer.get("errors"),
                              retry_after=float(retry_after) if retry_after else None)
            results.append(result)
        await _send_json(send, 200, json.dumps({"results": results}).encode())

    async def _batch(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        f = self.faults
        try:
            ids = [str(i) for i in json.loads(body)["rollout_ids"]]
        except (ValueError, KeyError, TypeError):
            ids = []
        if any(f.take("status_500", rid) for rid in ids):
            await _send_json(send, 500, b'{"detail": "injected: internal error"}')
            return
        await self._rewritten(scope, _replay(body), send, self._rewrite_batch)

    async def _rewritten(self, scope: dict[str, Any], receive: Any, send: Any, rewrite: Any) -> None:
        """Run the request, then send `rewrite(body)` instead of a 200 answer's body."""
        start, chunks, capture = _recorder()
        await self.app(scope, receive, capture)
        out = b"".join(chunks)
        if start.get("status") == 200:
            out = rewrite(out)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    def _rewrite_batch(self, out: bytes) -> bytes:
        answer = json.loads(out)
        for rid, st in answer["statuses"].items():
            if self.faults.take("malformed", rid):
                return out[: len(out) // 2]
            answer["statuses"][rid] = self._entry(rid, st)
        return json.dumps(answer).encode()  # NaN is written as the bare token NaN, as many servers do

    def _rewrite_one(self, rid: str, out: bytes) -> bytes:
        st = json.loads(out)
        if not st.get("terminated"):
            return out
        if self.faults.take("malformed", rid):
            return out[: len(out) // 2]
        return json.dumps(self._entry(rid, st)).encode()

    def _entry(self, rid: str, st: dict[str, Any]) -> dict[str, Any]:
        """A terminal status as the fault has it."""
        f = self.faults
        if f.take("spec", rid):
            return {"terminated": "soon", "status": {"code": "done"}, "reward": [1]}
        m = _INDEX.search(rid)
        if m and int(m.group(1)) in BAD_REWARDS and f.take("bad_rewards", rid):
            bad = BAD_REWARDS[int(m.group(1))]
            if bad is None:
                st.pop("reward", None)
            else:
                st["reward"] = math.nan if bad == "NaN" else bad
        return st


def build_app(args: argparse.Namespace) -> Any:
    faults = Faults(args.fault, args.match, args.times, args.delay, args.per_rollout)
    app = create_env_app(make_agent(faults), max_concurrency=args.capacity, deadline_s=3600.0, token=args.token,
                         name=f"flaky-{args.fault}")
    return FaultLayer(app, faults)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.flaky_env")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--match", default="", help="regex on rollout ids that get the fault (default: all)")
    parser.add_argument("--times", type=int, default=None, help="inject this many times, then behave")
    parser.add_argument("--per-rollout", type=int, default=None, help="inject at most this often per rollout id")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds matching agents sleep first")
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
