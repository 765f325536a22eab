"""Generation backends: what the gateway calls to turn prompt token ids into completion tokens.

`TransformersBackend` serves the live model object the learner trains (a `PeftModel` or a
plain transformers model, no copy of the weights). Concurrent `generate` calls start one
batch once no new call has arrived for `collect_window_s` (at most `max_collect_s` after
the first): left padding, a KV cache, and our own
decode loop (model forward + `past_key_values`), which gives the raw logits of every step
and lets each row stop on its own. The batching is continuous: a row's caller gets its
result the step it finishes, and requests arriving while a batch decodes join it at the
next step (up to `max_batch_size` rows), so multi-turn rollouts whose calls arrive at
different times still share forward passes. The torch work runs on one worker thread, so
the asyncio loop serving HTTP is never blocked. `generate_streamed` also hands each token to
the caller the step it is sampled (for `openrft serve`'s streamed chat completions).
`run_between_steps` runs a function (a pipelined trainer's adapter swap) on the worker between
two decode steps, never in the middle of one: tokens already sampled keep their recorded logprobs.

Recorded logprobs: the logprob of each sampled token is `log_softmax(logits)` of the raw
logits, at temperature 1, with no top-p renormalisation, whatever the sampling temperature
and top_p were. The learner computes the same quantity, so the GRPO importance ratio is
exactly 1 before the first update (up to batching numerics).
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

from trainer.generation.decoder import Decoder, Request
from trainer.types import BackendStats, Generation, SamplingParams, TokenSink

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    import torch


class TransformersBackend:
    """Batched generation with a live transformers/peft model on its own device (CPU or CUDA).

    `lock` is held while a batch runs (the model is in eval mode then, its training mode is
    restored before the lock is released); a learner sharing the model object holds it while
    it changes weights, so that no batch sees half an update. A steady stream of requests
    keeps a batch (and the lock) busy: synchronous training, where rollouts end before the
    update, never waits on it for long."""

    needs_adapter_dir = False

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 64,
        collect_window_s: float = 0.01,
        max_collect_s: float = 0.2,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.collect_window_s = collect_window_s
        self.max_collect_s = max_collect_s
        self.stats = BackendStats()
        self.lock = threading.Lock()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        self.eos_token_ids = frozenset(i for i in eos_ids if i is not None)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
        self._seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self._rng: torch.Generator | None = None
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._start_lock = threading.Lock()
        self._between: collections.deque[Callable[[], None]] = collections.deque()

    # --- public API -------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        return await self._submit(prompt_ids, params, None)

    async def generate_streamed(self, prompt_ids: list[int], params: SamplingParams, on_token: TokenSink) -> Generation:
        return await self._submit(prompt_ids, params, on_token)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, on_token: TokenSink | None) -> asyncio.Future[Generation]:
        """Queue a request for the worker; the future resolves with its result."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        bad = [i for i in prompt_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids contains ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
        if len(prompt_ids) >= self.max_positions:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; the model takes at most {self.max_positions - 1}")
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()
        self._queue.put(Request(list(prompt_ids), params, loop, future, on_token))
        return future

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Nothing to do: the backend generates with the very object the learner updates."""

    def close(self) -> None:
        """Stop the worker thread (after the batch in progress); requests still queued fail."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                Decoder._send(request, RuntimeError("the generation backend was closed"))

    async def run_between_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn` while no decode step is running: on the worker between two steps of a running
        batch, or here at once when the backend is idle. Returns once it ran (its error raised here)."""
        done = threading.Event()
        error: list[BaseException] = []

        def job() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to the awaiting caller, never to the decode loop
                error.append(exc)
            finally:
                done.set()

        self._between.append(job)
        while not done.is_set():
            if self.lock.acquire(blocking=False):  # idle (or between batches): run it here
                try:
                    self.between_steps()
                finally:
                    self.lock.release()
            else:
                await asyncio.sleep(0.002)
        if error:
            raise error[0]

    def between_steps(self) -> None:
        """Run the queued `run_between_steps` functions (the caller holds `lock`)."""
        while self._between:
            self._between.popleft()()

    # --- worker thread ----------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._worker, name="openrft-generate", daemon=True)
                self._thread.start()

    def _take(self, limit: int, gap: float | None) -> list[Request]:
        """Up to `limit` queued requests. gap=None: only those already queued. Otherwise keep
        taking while the next one arrives within `gap` s of the previous, for at most
        `max_collect_s` in all: a burst of requests (an HTTP server delivers them one by one)
        starts as one batch, and a lone request waits only `gap`."""
        taken: list[Request] = []
        end = time.monotonic() + self.max_collect_s
        while len(taken) < limit and not self._stopping:
            wait = 0.0 if gap is None else min(gap, end - time.monotonic())
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopping = True
            elif not item.future.done():  # not cancelled while queued
                taken.append(item)
        return taken

    def _worker(self) -> None:
        while not self._stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first, *self._take(self.max_batch_size - 1, self.collect_window_s)]
            batch = [r for r in batch if not r.future.done()]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[Request]) -> None:
        import torch

        with self.lock, torch.inference_mode():
            was_training = self.model.training
            self.model.eval()
            try:
                Decoder(self, batch).run()
            finally:
                if was_training:
                    self.model.train()
