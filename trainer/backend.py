"""Generation backends: what the gateway calls to turn prompt token ids into completion tokens.

`TransformersBackend` serves the live model object the learner trains (a `PeftModel` or a
plain transformers model, no copy of the weights). Concurrent `generate` calls arriving
within a short collection window are run as one batch: left padding, a KV cache, and our
own decode loop (model forward + `past_key_values`), which gives the raw logits of every
step and lets each row stop on its own. The torch work runs on one worker thread, so the
asyncio loop serving HTTP is never blocked, and one batch runs at a time.

Recorded logprobs: the logprob of each sampled token is `log_softmax(logits)` of the raw
logits, at temperature 1, with no top-p renormalisation, whatever the sampling temperature
and top_p were. The learner computes the same quantity, so the GRPO importance ratio is
exactly 1 before the first update (up to batching numerics).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """A completion: sampled token ids (including the stop token when one ended it), the
    temperature-1 logprob of each, and why it ended: "stop" (eos / stop token) or "length"."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@runtime_checkable
class GenerationBackend(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation: ...

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Called after each optimizer step; `adapter_dir` holds the new adapter when one was saved."""
        ...


@dataclass
class BackendStats:
    """Counters a test or benchmark can read: batches run, model forward calls, rows, tokens."""

    batches: int = 0
    forward_calls: int = 0
    rows: int = 0
    generated_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]


def _resolve(future: asyncio.Future[Generation], result: Generation | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class TransformersBackend:
    """Batched generation with a live transformers/peft model on its own device (CPU or CUDA).

    `lock` is held while a batch runs; a learner sharing the model object can hold it while
    it changes weights, so that no batch sees half an update."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 64,
        collect_window_s: float = 0.01,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.collect_window_s = collect_window_s
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
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # --- public API -------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
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
        self._queue.put(_Request(list(prompt_ids), params, loop, future))
        return await future

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Nothing to do: the backend generates with the very object the learner updates."""

    def close(self) -> None:
        """Stop the worker thread (after the batch in progress)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    # --- worker thread ----------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="openrft-generate", daemon=True)
                self._thread.start()

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """Gather requests arriving within the window after `first`; also say if asked to stop."""
        batch = [first]
        deadline = time.monotonic() + self.collect_window_s
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _worker(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            batch = [r for r in batch if not r.future.done()]  # cancelled while queued
            if not batch:
                continue
            try:
                results: list[Generation | BaseException] = list(self._run_batch(batch))
            except Exception as exc:  # surface to every caller, keep the worker alive
                results = [exc] * len(batch)
            for request, result in zip(batch, results):
                try:
                    request.loop.call_soon_threadsafe(_resolve, request.future, result)
                except RuntimeError:  # the caller's loop is closed: nobody waits for it
                    pass

    def _run_batch(self, batch: list[_Request]) -> list[Generation]:
        import torch

        with self.lock, torch.inference_mode():
            was_training = self.model.training
            self.model.eval()
            try:
                return self._decode(batch)
            finally:
                if was_training:
                    self.model.train()

    def _decode(self, batch: list[_Request]) -> list[Generation]:
        import torch

        model = self.model
        device = next(model.parameters()).device
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(self._seed)
        n = len(batch)
        lengths = [len(r.prompt_ids) for r in batch]
        width = max(lengths)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, width - lengths[i] :] = torch.tensor(r.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)

        params = [r.params for r in batch]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        stops = [self.eos_token_ids | set(p.stop_token_ids) for p in params]
        budgets = [min(p.max_tokens, self.max_positions - lengths[i]) for i, p in enumerate(params)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finish: list[str] = ["length"] * n
        active = list(range(n))  # original row index of each row still in the batch
        next_pos = torch.tensor(lengths, device=device)

        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.stats.batches += 1
        self.stats.rows += n
        self.stats.batch_sizes.append(n)
        self.stats.forward_calls += 1
        while True:
            logits = out.logits[:, -1, :].float()
            cache = out.past_key_values
            uniforms = torch.tensor(
                [float(torch.rand(1, generator=generators[i])) if generators[i] is not None else -1.0 for i in active]
            )
            shared = uniforms < 0
            if shared.any():
                uniforms[shared] = torch.rand(int(shared.sum()), generator=self._rng)
            sampled = _sample(logits, temps, top_ps, uniforms.to(device))
            chosen = torch.log_softmax(logits, dim=-1).gather(1, sampled[:, None])[:, 0]
            sampled_list, chosen_list = sampled.tolist(), chosen.tolist()
            keep: list[int] = []
            for j, i in enumerate(active):
                tok = sampled_list[j]
                tokens[i].append(tok)
                logprobs[i].append(chosen_list[j])
                if tok in stops[i]:
                    finish[i] = "stop"
                elif len(tokens[i]) < budgets[i]:
                    keep.append(j)
            self.stats.generated_tokens += len(active)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, sampled, temps, top_ps, next_pos = (t[index] for t in (mask, sampled, temps, top_ps, next_pos))
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = model(
                input_ids=sampled[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
            self.stats.forward_calls += 1
        return [Generation(tokens[i], logprobs[i], finish[i]) for i in range(n)]


def _sample(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else inverse-CDF sampling from the
    temperature-scaled distribution restricted to its top-p nucleus, driven by `uniforms`
    (one U[0,1) per row, so a seeded row's draw does not depend on its batch mates)."""
    import torch

    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], dim=-1)
    order = None
    if bool((top_ps < 1).any()):
        probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        probs = probs.masked_fill((probs.cumsum(-1) - probs) >= top_ps[:, None], 0.0)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp(max=logits.shape[-1] - 1)
    sampled = (order.gather(1, pick) if order is not None else pick)[:, 0]
    return torch.where(temps == 0, greedy, sampled)


Script = Callable[[list[int], SamplingParams], "str | list[int]"]


class ScriptedBackend:
    """A backend that answers from a script instead of sampling: `script(prompt_ids, params)`
    returns the completion as text (encoded, then eos appended) or as token ids (used as is).
    For tests and demos that need a model to make exact tool calls.

    With `model`, the logprobs are that model's temperature-1 logprobs of the scripted tokens
    (teacher forcing), so a learner sees the numbers a real sampler would have recorded;
    without one they are 0.0. max_tokens and stop tokens apply as in sampling."""

    def __init__(self, tokenizer: Any, script: Script, *, model: Any = None) -> None:
        self.tokenizer, self.script, self.model = tokenizer, script, model
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        out = self.script(list(prompt_ids), params)
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer.encode(out, add_special_tokens=False) + [eos] if isinstance(out, str) else list(out)
        if not ids:
            raise ValueError("the script returned an empty completion")
        stops = {eos, *params.stop_token_ids}
        finish = "length"
        for k, tok in enumerate(ids[: params.max_tokens]):
            if tok in stops:
                ids, finish = ids[: k + 1], "stop"
                break
        else:
            ids = ids[: params.max_tokens]
        self.prompts.append(list(prompt_ids))
        logprobs = await asyncio.to_thread(self._logprobs, prompt_ids, ids) if self.model is not None else [0.0] * len(ids)
        return Generation(ids, logprobs, finish)

    def _logprobs(self, prompt_ids: list[int], ids: list[int]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                logits = self.model(torch.tensor([list(prompt_ids) + ids], device=device)).logits[0].float()
        finally:
            self.model.train(was_training)
        logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        return logp.gather(1, torch.tensor(ids, device=device)[:, None])[:, 0].tolist()

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Nothing to reload."""
