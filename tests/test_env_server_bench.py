"""bench/protocol.py's measuring loop, in-process against real servers (a quick run, not a benchmark)."""

from __future__ import annotations

import os

from bench.protocol import PLAN, bare_app, measure, openrft_app
from tests.helpers import serve_app


async def test_every_row_completes_lifecycles() -> None:
    with serve_app(openrft_app()) as openrft_url, serve_app(bare_app()) as bare_url:
        servers = {"openrft": (openrft_url, os.getpid()), "bare": (bare_url, os.getpid())}
        cells = await measure(servers, [1, 16], duration=0.4, rounds=1, linger_s=0.01, connections=4)
    assert {(c.server, c.mode, c.inflight) for c in cells} == {(s, m, n) for s, m in PLAN for n in (1, 16)}
    for c in cells:
        assert c.done > 0 and len(c.life_ms) == c.done and c.rate > 0, c
        assert all(life >= init > 0 for init, life in zip(c.init_ms, c.life_ms)), c
