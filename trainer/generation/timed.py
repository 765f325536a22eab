"""A backend wrapper that measures generation: the wall time during which any generation ran and
the tokens produced (a step's `time/generate` and throughput)."""

from __future__ import annotations

import time
from pathlib import Path

from trainer.types import Generation, GenerationBackend, SamplingParams


class TimedBackend:
    """Wraps a backend to measure the wall time during which any generation was running and the
    tokens it produced (the step's `time/generate` and generation throughput)."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner
        self.needs_adapter_dir = inner.needs_adapter_dir
        self.lock = inner.lock
        self.stats = inner.stats
        self.busy_s = 0.0
        self.tokens = 0
        self._active = 0
        self._since = 0.0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self._active == 0:
            self._since = time.perf_counter()
        self._active += 1
        try:
            out = await self.inner.generate(prompt_ids, params)
            self.tokens += len(out.token_ids)
            return out
        finally:
            self._active -= 1
            if self._active == 0:
                self.busy_s += time.perf_counter() - self._since

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        await self.inner.weights_updated(adapter_dir)

    def take(self) -> tuple[float, int]:
        """(busy seconds, tokens) since the last take."""
        now = time.perf_counter()
        busy = self.busy_s + (now - self._since if self._active else 0.0)
        if self._active:
            self._since = now
        out = (busy, self.tokens)
        self.busy_s, self.tokens = 0.0, 0
        return out

    def close(self) -> None:
        self.inner.close()
