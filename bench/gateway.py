"""Gateway overhead: the same batch of completions through the gateway vs the backend called
directly.

    python -m bench.gateway [--model DIR|smollm2] [--rollouts 64] [--max-tokens 64] [--rounds 5] [--threads N]

All paths generate the very same tokens (same prompt ids, same per-request seeds), so the
differences are what sits in front of the backend. `direct` does what a caller of the
backend must do itself: render the chat template, tokenize, generate, decode the text; the
difference is then HTTP and the gateway's own work (validation, auth, tool-call parsing,
recording, the response). The requests come from a separate process, as envs are, one
rollout (URL + key) per request, all sent at once:

- `gateway`: a lean HTTP/1.1 client on open keep-alive connections, so the time is the
  gateway's (uvicorn, validation, chat rendering, recording, response) and not the client's;
- `gateway+openai`: the official `openai` client per rollout over one shared pooled httpx
  client, as env_sdk's server makes them: what an env actually pays, client included.

torch gets the trainer's CPU default of threads (`threads` unset: one less than the cores, at
least 1), since the gateway shares the process with the backend: with a thread per core, any
request the event loop serves stalls torch's other threads (OpenMP waits for the slowest).

The last line is the ratio gateway / direct of the median wall times (target <= 1.05).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch
import uvicorn
from openai import AsyncOpenAI

from env_sdk.models import RolloutMetadata
from trainer.generation import TransformersBackend
from trainer.types import SamplingParams
from trainer.gateway.chat import render_prompt
from trainer.gateway import Gateway
from trainer.models import build_tiny_model, load_model
from trainer.models.smollm2 import convert_smollm2

PATHS = ("direct", "gateway", "gateway+openai")


def _messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"What is {i} + {2 * i + 7}?"}]


def _body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": "policy", "messages": _messages(i), "max_tokens": max_tokens, "temperature": 1.0, "seed": i}


class _Server:
    """uvicorn on a loopback port in a thread of this process (as the trainer runs its gateway)."""

    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# --- the envs' process ----------------------------------------------------------------------


async def _lean_post(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> dict[str, Any]:
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return json.loads(await reader.readexactly(length))


def _lean_request(url: str, key: str, body: dict[str, Any]) -> bytes:
    parts = urlsplit(url + "/chat/completions")
    payload = json.dumps(body).encode()
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def _env_process(conn: Connection, base: str) -> None:
    """For each job: set up (untimed), say "ready", on "go" send every request at once."""

    async def serve() -> None:
        host, port = urlsplit(base).hostname, urlsplit(base).port
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024), timeout=600)
        while (job := conn.recv()) is not None:
            kind, opened, max_tokens = job
            if kind == "gateway":
                requests = [_lean_request(url, key, _body(i, max_tokens)) for i, (url, key) in enumerate(opened)]
                lean = [await asyncio.open_connection(host, port) for _ in requests]
                conn.send("ready")
                conn.recv()
                replies = await asyncio.gather(*(_lean_post(c, r) for c, r in zip(lean, requests)))
                conn.send(sum(r["usage"]["completion_tokens"] for r in replies))
                for _, writer in lean:
                    writer.close()
            else:
                clients = [AsyncOpenAI(base_url=url, api_key=key, max_retries=0, http_client=http) for url, key in opened]
                conn.send("ready")
                conn.recv()
                answers = await asyncio.gather(*(c.chat.completions.create(**_body(i, max_tokens)) for i, c in enumerate(clients)))
                conn.send(sum(a.usage.completion_tokens for a in answers if a.usage))
        await http.aclose()

    asyncio.run(serve())


# --- the trainer's process --------------------------------------------------------------------


async def _direct_one(backend: TransformersBackend, tokenizer: Any, i: int, max_tokens: int) -> int:
    prompt = render_prompt(tokenizer, _messages(i))
    gen = await backend.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i))
    tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    return len(gen.token_ids)


async def _direct(backend: TransformersBackend, tokenizer: Any, rollouts: int, max_tokens: int) -> int:
    return sum(await asyncio.gather(*(_direct_one(backend, tokenizer, i, max_tokens) for i in range(rollouts))))


def _open_rollouts(gateway: Gateway, base: str, tag: str, rollouts: int) -> list[tuple[str, str]]:
    """One rollout per request: its model_base_url and api_key."""
    opened = []
    for i in range(rollouts):
        meta = RolloutMetadata(invocation_id="b", experiment_id="b", rollout_id=f"{tag}-{i}", run_id="b", row_id=str(i))
        opened.append(gateway.open_rollout(meta, base))
    return opened


async def _remote(conn: Connection, kind: str, opened: list[tuple[str, str]], max_tokens: int) -> tuple[int, float]:
    """Tokens generated and wall seconds from "go" to the last reply."""
    conn.send((kind, opened, max_tokens))
    assert await asyncio.to_thread(conn.recv) == "ready"
    start = time.perf_counter()
    conn.send("go")
    tokens = await asyncio.to_thread(conn.recv)
    return tokens, time.perf_counter() - start


async def run(model_dir: Path, rollouts: int, max_tokens: int, rounds: int) -> float:
    model, tokenizer = load_model(model_dir)
    backend = TransformersBackend(model, tokenizer, max_batch_size=rollouts)
    gateway = Gateway(backend, tokenizer)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    tokens: dict[str, int] = {}
    batches: dict[str, list[int]] = {}
    forwards: dict[str, int] = {}
    ctx = multiprocessing.get_context("spawn")
    with _Server(gateway.app) as base:
        conn, child = ctx.Pipe()
        envs = ctx.Process(target=_env_process, args=(child, base), daemon=True)
        envs.start()
        await _direct(backend, tokenizer, rollouts, 4)  # warm up every path
        for kind in PATHS[1:]:
            await _remote(conn, kind, _open_rollouts(gateway, base, f"warm-{kind}", rollouts), 4)
        for r in range(rounds):
            for name in PATHS[r % 3 :] + PATHS[: r % 3]:  # rotate the order
                seen, calls = len(backend.stats.batch_sizes), backend.stats.forward_calls
                if name == "direct":
                    start = time.perf_counter()
                    tokens[name] = await _direct(backend, tokenizer, rollouts, max_tokens)
                    times[name].append(time.perf_counter() - start)
                else:
                    opened = _open_rollouts(gateway, base, f"{name}-{r}", rollouts)
                    tokens[name], wall = await _remote(conn, name, opened, max_tokens)
                    times[name].append(wall)
                batches[name] = backend.stats.batch_sizes[seen:]
                forwards[name] = backend.stats.forward_calls - calls
        conn.send(None)
        envs.join(timeout=30)
    backend.close()
    assert len(set(tokens.values())) == 1, tokens  # the same work on every path
    print(f"{rollouts} concurrent completions x {max_tokens} tokens, model {model_dir}, {rounds} rounds (median), "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'path':<16}{'wall s':>9}{'tokens':>8}{'tokens/s':>10}{'forwards':>10}  batches (rows at start; later ones joined)")
    for name in PATHS:
        wall = statistics.median(times[name])
        print(f"{name:<16}{wall:>9.3f}{tokens[name]:>8}{tokens[name] / wall:>10.1f}{forwards[name]:>10}  {batches[name]}")
    direct = statistics.median(times["direct"])
    with_client = statistics.median(times["gateway+openai"]) / direct
    ratio = statistics.median(times["gateway"]) / direct
    print(f"ratio gateway+openai/direct: {with_client:.3f}")
    print(f"ratio gateway/direct: {ratio:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory, or smollm2 (default: a fresh tiny model)")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1), help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "smollm2":
            model_dir = convert_smollm2()
        else:
            model_dir = Path(args.model) if args.model else build_tiny_model(Path(tmp) / "tiny")
        asyncio.run(run(model_dir, args.rollouts, args.max_tokens, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
