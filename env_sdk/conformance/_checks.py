"""The checks, each a method of `Conformance` that raises a `Verdict` (or returns a detail on a
pass), and the `CheckResult` each ends as."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from env_sdk.models import (
    CAP_INIT_BATCH,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    CancelResponse,
    Health,
    InitBatchResponse,
    StatusBatchResponse,
    StatusCode,
    StatusResponse,
    VersionResponse,
)

Level = Literal["core", "v1"]
CheckStatus = Literal["pass", "fail", "absent", "skip"]

CORE: Level = "core"
V1: Level = "v1"
PASS: CheckStatus = "pass"
FAIL: CheckStatus = "fail"
ABSENT: CheckStatus = "absent"
SKIP: CheckStatus = "skip"

HEALTH = "health (capacity)"
BATCHED_STATUS = "batched status"
BATCHED_INIT = "batched init (optional)"
#: Extensions openrft's trainer uses whenever a server answers them: broken, they break training.
TRAINER_USES = frozenset({HEALTH, BATCHED_STATUS, BATCHED_INIT})


@dataclass(frozen=True)
class CheckResult:
    name: str
    level: Level
    status: CheckStatus
    detail: str = ""
    required: bool = False  # must be present: core checks, and v1 ones with --strict or a v1 claim

    @property
    def fails(self) -> bool:
        return self.status == FAIL or (self.status == ABSENT and self.required)


class Verdict(Exception):
    """Ends a check with `status`; the message is the detail."""

    status: CheckStatus


class CheckFailed(Verdict):
    status = FAIL


class Absent(Verdict):
    status = ABSENT


class Skipped(Verdict):
    status = SKIP


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def _first_error(exc: ValidationError, resp: httpx.Response) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']} (got {resp.text[:120]!r})"


def _shape(model: type[Any], resp: httpx.Response) -> Any:
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        raise CheckFailed(f"body is not a {model.__name__}: {_first_error(exc, resp)}") from None


def _present(resp: httpx.Response, what: str) -> None:
    if resp.status_code in (404, 405):
        raise Absent(f"{what}: HTTP {resp.status_code}")


def _own_route(model: type[Any], resp: httpx.Response, what: str) -> Any:
    """Parse an openrft GET extension's 200 body. Web apps often have a `/health` of their own
    (eval-protocol's servers answer `{"status": "ok"}`): a body that is not openrft's model is that
    route, so the extension is absent rather than broken (the trainer reads it the same way)."""
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        raise Absent(f"{what} answers 200 with a body of its own, not openrft's {model.__name__}: "
                     f"{_first_error(exc, resp)}") from None


def _has_message(resp: httpx.Response) -> bool:
    """A 4xx body that tells the caller something: JSON `detail`/`message`/`error`, or plain text."""
    try:
        body = resp.json()
    except ValueError:
        return bool(resp.text.strip())
    if isinstance(body, dict):
        return any(body.get(k) for k in ("detail", "message", "error"))
    return bool(body)


Check = Callable[[], Awaitable[str]]


@dataclass
class Conformance:
    url: str
    token: str | None
    model_url: str
    task: dict[str, Any]
    strict: bool = False
    deadline_s: float = 30.0
    init_fast_s: float = 1.0
    model_calls: Counter[str] | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    protocol_headers: set[str] = field(default_factory=set)
    http: httpx.AsyncClient = field(init=False)

    @property
    def claims_v1(self) -> bool:
        return PROTOCOL_VERSION in self.protocol_headers

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def body(self, rid: str) -> dict[str, Any]:
        ids = {"invocation_id": "conformance", "experiment_id": "conformance", "rollout_id": rid,
               "run_id": self.run_id, "row_id": "0"}
        gateway = self.model_url.rstrip("/") + "/" + "/".join(f"{k}/{v}" for k, v in [
            ("rollout_id", rid), ("invocation_id", "conformance"), ("experiment_id", "conformance"),
            ("run_id", self.run_id), ("row_id", "0")])
        return {"completion_params": {"model": "policy", "temperature": 1.0, "max_tokens": 32},
                "messages": [{"role": "user", "content": "Say hello."}], "model_base_url": gateway,
                "api_key": f"conformance-{rid}", "metadata": ids, **self.task}

    def rid(self, label: str) -> str:
        return f"conf-{self.run_id}-{label}"

    async def _note_protocol(self, resp: httpx.Response) -> None:
        if PROTOCOL_HEADER in resp.headers:
            self.protocol_headers.add(resp.headers[PROTOCOL_HEADER])

    async def run(self) -> list[CheckResult]:
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers(), timeout=30,
                                     event_hooks={"response": [self._note_protocol]}) as self.http:
            results = [await self._check(name, level, fn) for name, level, fn in self._checks()]
        return self._settle_absent(results)

    def _checks(self) -> list[tuple[str, Level, Check]]:
        return [
            ("init accepted fast", CORE, self.init_fast),
            ("status shape", CORE, self.status_shape),
            ("terminal state reached", CORE, self.terminal),
            ("idempotent init", CORE, self.idempotent),
            ("unknown id -> 404", CORE, self.unknown_id),
            ("bad body -> 4xx + message", CORE, self.bad_body),
            (HEALTH, V1, self.health),
            ("version discovery", V1, self.version),
            ("bearer token -> 401", V1, self.auth),
            ("cancel", V1, self.cancel),
            (BATCHED_STATUS, V1, self.batched_status),
            (BATCHED_INIT, V1, self.batched_init),
        ]

    @staticmethod
    async def _check(name: str, level: Level, fn: Check) -> CheckResult:
        try:
            return CheckResult(name, level, PASS, await fn())
        except Verdict as exc:
            return CheckResult(name, level, exc.status, str(exc))
        except httpx.HTTPError as exc:
            return CheckResult(name, level, FAIL, f"{type(exc).__name__}: {exc}")

    def _settle_absent(self, results: list[CheckResult]) -> list[CheckResult]:
        """Mark what must be present: core checks always, v1 extensions when the server claims v1 or
        with --strict (decided at the end: the claim may come with any answer)."""
        if self.claims_v1:
            why = f"required of a v1 server (it sends {PROTOCOL_HEADER}: {PROTOCOL_VERSION})"
        elif self.strict:
            why = "required by --strict"
        else:
            return [replace(r, required=r.level == CORE) for r in results]
        return [replace(r, required=True, detail=f"{r.detail}; {why}" if r.status == ABSENT else r.detail)
                for r in results]

    async def wait_terminal(self, rid: str, within_s: float) -> StatusResponse:
        end = time.monotonic() + within_s
        while True:
            resp = await self.http.get("/status", params={"rollout_id": rid, "wait_s": 1.0}, timeout=within_s + 5)
            _expect(resp.status_code == 200, f"GET /status for a started rollout: HTTP {resp.status_code}")
            st: StatusResponse = _shape(StatusResponse, resp)
            if st.terminated:
                return st
            if time.monotonic() > end:
                raise CheckFailed(f"rollout {rid} not terminal after {within_s:g}s")
            await asyncio.sleep(0.05)

    async def start(self, rid: str) -> httpx.Response:
        return await self.http.post("/init", json=self.body(rid))

    # core

    async def init_fast(self) -> str:
        rid = self.rid("main")
        t0 = time.monotonic()
        resp = await self.start(rid)
        took = time.monotonic() - t0
        _expect(resp.status_code in (200, 202), f"POST /init: HTTP {resp.status_code}: {resp.text[:200]}")
        _expect(took <= self.init_fast_s, f"POST /init took {took:.2f}s (> {self.init_fast_s:g}s): it must "
                                          "return before the rollout runs")
        with contextlib.suppress(ValueError):
            body = resp.json()
            answered = body.get("rollout_id") if isinstance(body, dict) else None
            _expect(answered in (None, rid), f"answered rollout_id {answered!r}, sent {rid!r}")
        return f"HTTP {resp.status_code} in {took * 1000:.0f} ms"

    async def status_shape(self) -> str:
        resp = await self.http.get("/status", params={"rollout_id": self.rid("main")})
        _expect(resp.status_code == 200, f"GET /status: HTTP {resp.status_code}")
        st: StatusResponse = _shape(StatusResponse, resp)
        return f"terminated={st.terminated}, code {st.status.code if st.status else '- (no status object)'}"

    async def terminal(self) -> str:
        rid = self.rid("main")
        st = await self.wait_terminal(rid, self.deadline_s)
        if st.status is not None and not st.status.ok:
            raise CheckFailed(f"the rollout failed: code {st.status.code} {st.status.message!r} (does the env "
                              "need a real task? pass one with --task FILE)")
        if st.reward is not None:
            _expect(0.0 <= st.reward <= 1.0, f"reward {st.reward} outside [0, 1]")
        calls = (self.model_calls or Counter()).get(rid, 0)
        code = f"code {st.status.code} {st.status.message!r}" if st.status else "no status object (read as FINISHED)"
        return f"{code}, reward {st.reward}, {calls} model call(s)"

    async def idempotent(self) -> str:
        main_rid, dup_rid = self.rid("main"), self.rid("dup")
        first = await self.start(dup_rid)
        second = await self.start(dup_rid)
        _expect(first.status_code in (200, 202), f"first POST /init: HTTP {first.status_code}")
        _expect(second.status_code in (200, 202), f"repeated POST /init with the same rollout_id: "
                                                  f"HTTP {second.status_code}, expected 200 or 202")
        await self.wait_terminal(dup_rid, self.deadline_s)
        if self.model_calls is not None and self.model_calls.get(main_rid):
            once, twice = self.model_calls[main_rid], self.model_calls[dup_rid]
            _expect(twice == once, f"the repeated rollout made {twice} model calls, a single one {once}: "
                                   "it ran twice")
        return f"HTTP {first.status_code} then {second.status_code}, one rollout"

    async def unknown_id(self) -> str:
        resp = await self.http.get("/status", params={"rollout_id": self.rid("never-started")})
        _expect(resp.status_code == 404, f"GET /status for an unknown id: HTTP {resp.status_code}, expected 404")
        return "404"

    async def bad_body(self) -> str:
        seen = []
        cases: list[tuple[str, dict[str, Any]]] = [
            ("malformed JSON", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
            ("missing metadata", {"json": {"messages": []}}),
            ("wrong type", {"json": {**self.body(self.rid("bad")), "messages": "hello"}}),
        ]
        for label, kw in cases:
            resp = await self.http.post("/init", **kw)
            _expect(400 <= resp.status_code < 500, f"{label}: HTTP {resp.status_code}, expected 4xx")
            _expect(resp.status_code not in (401, 403, 404, 429), f"{label}: HTTP {resp.status_code}")
            _expect(_has_message(resp), f"{label}: HTTP {resp.status_code} without a message")
            seen.append(str(resp.status_code))
        resp = await self.http.get("/status")
        _expect(400 <= resp.status_code < 500, f"GET /status without rollout_id: HTTP {resp.status_code}")
        return "/".join(seen) + " with messages"

    # v1 extensions

    async def health(self) -> str:
        resp = await self.http.get("/health")
        _present(resp, "GET /health")
        _expect(resp.status_code == 200, f"GET /health: HTTP {resp.status_code}")
        h: Health = _own_route(Health, resp, "GET /health")
        _expect(h.capacity >= 1, f"capacity {h.capacity} < 1")
        return f"capacity {h.capacity}, in flight {h.in_flight}"

    async def version(self) -> str:
        resp = await self.http.get("/version")
        _present(resp, "GET /version")
        _expect(resp.status_code == 200, f"GET /version: HTTP {resp.status_code}")
        v: VersionResponse = _own_route(VersionResponse, resp, "GET /version")
        _expect(v.protocol_version == PROTOCOL_VERSION, f"protocol_version {v.protocol_version!r}, expected "
                                                        f"{PROTOCOL_VERSION!r}")
        header = resp.headers.get(PROTOCOL_HEADER)
        _expect(header == PROTOCOL_VERSION, f"{PROTOCOL_HEADER} header is {header!r}")
        return f"v{v.protocol_version} ({v.sdk or v.name}), header {header}"

    async def auth(self) -> str:
        if not self.token:
            raise Skipped("no --token given")
        probes: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/init", {"json": self.body(self.rid("auth"))}),
            ("GET", "/status", {"params": {"rollout_id": self.rid("main")}}),
        ]
        for label, headers in [("no token", {}), ("wrong token", {"Authorization": "Bearer not-the-token"})]:
            async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30) as anon:
                for method, path, kw in probes:
                    resp = await anon.request(method, path, **kw)
                    _expect(resp.status_code == 401, f"{method} {path} with {label}: HTTP {resp.status_code}, "
                                                     "expected 401")
        return "401 without / with a wrong token"

    async def cancel(self) -> str:
        rid = self.rid("cancel")
        started = await self.start(rid)
        if started.status_code not in (200, 202):
            raise Skipped(f"needs a started rollout; POST /init: HTTP {started.status_code}")
        resp = await self.http.post("/cancel", params={"rollout_id": rid})
        _present(resp, "POST /cancel")
        _expect(resp.status_code == 200, f"POST /cancel: HTTP {resp.status_code}, expected 200")
        answer: CancelResponse = _shape(CancelResponse, resp)
        _expect(answer.rollout_id == rid, f"answered rollout_id {answer.rollout_id!r}, sent {rid!r}")
        st = await self.wait_terminal(rid, 10.0)
        code = st.status.code if st.status else None
        _expect(not answer.cancelled or code == StatusCode.CANCELLED,
                f"cancelled: true, but the status reads code {code}, expected {int(StatusCode.CANCELLED)}")
        missing = await self.http.post("/cancel", params={"rollout_id": self.rid("never-started")})
        _expect(missing.status_code == 404, f"POST /cancel for an unknown id: HTTP {missing.status_code}")
        return f"cancelled={answer.cancelled}, terminal with code {code if code is not None else '-'}"

    async def batched_status(self) -> str:
        main_rid, ghost = self.rid("main"), self.rid("ghost")
        resp = await self.http.post("/status/batch", json={"rollout_ids": [main_rid, ghost], "wait_s": 1.0})
        _present(resp, "POST /status/batch")
        _expect(resp.status_code == 200, f"POST /status/batch: HTTP {resp.status_code}")
        b: StatusBatchResponse = _shape(StatusBatchResponse, resp)
        _expect(main_rid in b.statuses, "a terminal rollout is missing from `statuses`")
        _expect(b.unknown == [ghost], f"unknown = {b.unknown}, expected [{ghost!r}]")
        return "terminal listed, unknown id reported"

    async def batched_init(self) -> str:
        resp = await self.http.get("/version")
        capabilities: list[str] = []
        if resp.status_code == 200:
            with contextlib.suppress(ValidationError):
                capabilities = VersionResponse.model_validate_json(resp.content).capabilities
        if CAP_INIT_BATCH not in capabilities:
            raise Skipped("optional, not advertised in GET /version capabilities (so not sent)")
        rid = self.rid("batch")
        items = [self.body(rid), self.body(rid), {"messages": "hello"}]
        resp = await self.http.post("/init/batch", json={"requests": items})
        _expect(resp.status_code == 200, f"POST /init/batch: HTTP {resp.status_code}: {resp.text[:200]}")
        b: InitBatchResponse = _shape(InitBatchResponse, resp)
        codes = [r.status_code for r in b.results]
        _expect(len(codes) == 3, f"{len(codes)} results for 3 requests")
        _expect(codes[0] in (200, 202) and codes[1] == 200, f"a new rollout then its repeat: HTTP {codes[:2]}, "
                                                            "expected 202 (or 200) then 200")
        _expect(400 <= codes[2] < 500 and bool(b.results[2].detail), f"an invalid item: HTTP {codes[2]}, "
                                                                     f"detail {b.results[2].detail!r}")
        await self.wait_terminal(rid, self.deadline_s)
        return f"per item: {'/'.join(map(str, codes))}"
