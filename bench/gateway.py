"""Gateway overhead: the same batch of completions through the gateway (real uvicorn, the
official `openai` client, one rollout per request) vs the backend called directly.

    python -m bench.gateway [--model DIR] [--rollouts 64] [--max-tokens 64] [--rounds 3]

Both paths generate the very same tokens (same prompt ids, same per-request seeds), so the
difference is what the gateway adds: HTTP, request validation, chat rendering, response
building, recording, and any batch the gateway fails to fill. The last line is the ratio
gateway / direct of the median wall times (target <= 1.05).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from openai import AsyncOpenAI

from env_sdk.models import RolloutMetadata
from trainer.backend import SamplingParams, TransformersBackend
from trainer.chat import render_prompt
from trainer.gateway import Gateway
from trainer.models import build_tiny_model, load_model


def _messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"What is {i} + {2 * i + 7}?"}]


class _Server:
    """uvicorn on a loopback port in a thread (its own event loop, as an env's model calls would be)."""

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


async def _direct(backend: TransformersBackend, prompts: list[list[int]], max_tokens: int) -> int:
    gens = await asyncio.gather(
        *(backend.generate(p, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i)) for i, p in enumerate(prompts))
    )
    return sum(len(g.token_ids) for g in gens)


def _open_clients(gateway: Gateway, base: str, round_: int, rollouts: int) -> list[AsyncOpenAI]:
    """One rollout and one client per request, as each env would have (set up before timing)."""
    clients = []
    for i in range(rollouts):
        meta = RolloutMetadata(invocation_id="b", experiment_id="b", rollout_id=f"r{round_}-{i}", run_id="b", row_id=str(i))
        url, key = gateway.open_rollout(meta, base)
        clients.append(AsyncOpenAI(base_url=url, api_key=key, max_retries=0))
    return clients


async def _through_gateway(clients: list[AsyncOpenAI], max_tokens: int) -> int:
    replies = await asyncio.gather(
        *(
            c.chat.completions.create(model="policy", messages=_messages(i), max_tokens=max_tokens, temperature=1.0, seed=i)  # type: ignore[arg-type]
            for i, c in enumerate(clients)
        )
    )
    return sum(r.usage.completion_tokens for r in replies if r.usage)


async def run(model_dir: Path, rollouts: int, max_tokens: int, rounds: int, window: float) -> float:
    model, tokenizer = load_model(model_dir)
    backend = TransformersBackend(model, tokenizer, max_batch_size=rollouts, collect_window_s=window)
    gateway = Gateway(backend, tokenizer)
    prompts = [render_prompt(tokenizer, _messages(i)) for i in range(rollouts)]
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    tokens: dict[str, int] = {}
    batches: dict[str, list[int]] = {"direct": [], "gateway": []}
    with _Server(gateway.app) as base:
        await _direct(backend, prompts, 4)  # warm up both paths
        await _through_gateway(_open_clients(gateway, base, -1, rollouts), 4)
        for r in range(rounds):
            clients = _open_clients(gateway, base, r, rollouts)
            for name in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):
                seen = len(backend.stats.batch_sizes)
                start = time.perf_counter()
                if name == "direct":
                    tokens[name] = await _direct(backend, prompts, max_tokens)
                else:
                    tokens[name] = await _through_gateway(clients, max_tokens)
                times[name].append(time.perf_counter() - start)
                batches[name] = backend.stats.batch_sizes[seen:]
            for c in clients:
                await c.close()
    backend.close()
    assert tokens["direct"] == tokens["gateway"], tokens  # same work on both paths
    print(f"{rollouts} concurrent completions x {max_tokens} tokens, model {model_dir}, {rounds} rounds (median)")
    print(f"{'path':<10}{'wall s':>10}{'tokens':>10}{'tokens/s':>12}  batches (rows at start; later ones joined)")
    for name in ("direct", "gateway"):
        wall = statistics.median(times[name])
        print(f"{name:<10}{wall:>10.3f}{tokens[name]:>10}{tokens[name] / wall:>12.1f}  {batches[name]}")
    ratio = statistics.median(times["gateway"]) / statistics.median(times["direct"])
    print(f"ratio gateway/direct: {ratio:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: a fresh tiny model)")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=0.01, help="the backend's collection window, seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "tiny")
        asyncio.run(run(model_dir, args.rollouts, args.max_tokens, args.rounds, args.window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
