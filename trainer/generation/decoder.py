"""The decode loop of `TransformersBackend`: one batch of requests, left padded, a KV cache, one
model forward per step over the rows still running; rows join at any step and leave the step they
finish (continuous batching); sampling with per-request seeds and temperature-1 logprobs."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainer.types import Generation, SamplingParams, TokenSink

if TYPE_CHECKING:
    import torch

    from trainer.generation.transformers_backend import TransformersBackend


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]
    on_token: TokenSink | None = None


def _resolve(future: asyncio.Future[Generation], result: Generation | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


#: Shortest prefix shared by the prompts of one prefill that is computed once (shorter: not worth a forward).
SHARED_PREFIX_MIN = 16

#: Sampling uniforms drawn per row at a time.
_DRAWS = 64


@dataclass
class _Row:
    request: Request
    prompt: tuple[int, ...]
    generator: torch.Generator | None  # per-request seed: draws independent of batch mates
    stops: frozenset[int]
    budget: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_logits: torch.Tensor | None = None  # next-token logits right after the prompt
    draws: list[float] = field(default_factory=list)  # this row's coming sampling uniforms


class Decoder:
    """One run of the decode loop. Rows leave as soon as they finish (their caller gets the
    result at once) and queued requests join at any step (continuous batching): a joining
    group is prefilled on its own, then its KV cache is left-padded to the running width
    and concatenated along the batch dimension. Columns no remaining row attends to are
    trimmed from the left."""

    def __init__(self, backend: TransformersBackend, batch: list[Request]) -> None:
        import torch

        self.backend = backend
        self.model = backend.model
        self.device = next(self.model.parameters()).device
        if backend._rng is None:
            backend._rng = torch.Generator().manual_seed(backend._seed)
        self.first = batch
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 where a row has a token
        self.next_pos: torch.Tensor | None = None  # [rows]: position of each row's next token
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits
        self.temps: torch.Tensor | None = None
        self.top_ps: torch.Tensor | None = None
        self.can_join = False

    def run(self) -> None:
        stats = self.backend.stats
        stats.batches += 1
        stats.batch_sizes.append(len(self.first))
        pending = self.first
        try:
            self._admit(pending)
            while self.rows:
                self._step()
                self.backend.between_steps()  # e.g. a pipelined trainer's adapter swap, never mid-step
                if not self.rows:
                    break
                room = self.backend.max_batch_size - len(self.rows)
                pending = self.backend._take(room, None) if room > 0 and self.can_join else []
                if pending:
                    stats.joined += len(pending)
                    self._admit(pending)
        except Exception as exc:  # every caller still waiting gets the error; the worker lives on
            for request in [row.request for row in self.rows] + pending:
                self._send(request, exc)

    @staticmethod
    def _send(request: Request, result: Generation | BaseException) -> None:
        try:
            request.loop.call_soon_threadsafe(_resolve, request.future, result)
        except RuntimeError:  # the caller's loop is closed: nobody waits for it
            pass

    @staticmethod
    def _report(loop: asyncio.AbstractEventLoop, sink: TokenSink, token: int) -> None:
        """`sink(token)` on the caller's loop: queued before the result, so it runs first."""
        try:
            loop.call_soon_threadsafe(sink, token)
        except RuntimeError:  # the caller's loop is closed: nobody waits for it
            pass

    def _admit(self, requests: list[Request]) -> None:
        """Add `requests` to the running rows. Their prompts are prefilled together, except
        that identical prompts (a GRPO group's rollouts share one) are computed once: within
        the joining requests, and against rows already running, whose prompt KV is copied."""
        import torch

        backend, device = self.backend, self.device
        running = {row.prompt: j for j, row in enumerate(self.rows)} if self.can_join else {}
        fresh = [r for r in requests if tuple(r.prompt_ids) not in running]
        copied = [r for r in requests if tuple(r.prompt_ids) in running]
        parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]] = []
        if fresh:
            cache, mask, logits = self._prefill(fresh)
            if self.cache is None:  # the batch's first rows: their cache becomes the running one
                self.cache = cache
                self.can_join = _editable(cache)
                self.mask, self.logits = mask, logits
            else:
                parts.append(([(layer.keys, layer.values) for layer in cache.layers], mask, logits))
        for r in copied:
            parts.append(self._prompt_of(running[tuple(r.prompt_ids)]))
        backend.stats.rows += len(requests)
        params = [r.params for r in fresh + copied]
        rows = [
            _Row(
                request=r,
                prompt=tuple(r.prompt_ids),
                generator=torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else None,
                stops=backend.eos_token_ids | frozenset(r.params.stop_token_ids),
                budget=min(r.params.max_tokens, backend.max_positions - len(r.prompt_ids)),
            )
            for r in fresh + copied
        ]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        next_pos = torch.tensor([len(r.prompt_ids) for r in fresh + copied], device=device)
        if parts:
            assert self.mask is not None and self.logits is not None
            running_part = ([(layer.keys, layer.values) for layer in self.cache.layers], self.mask, self.logits)
            self._concat([running_part, *parts])
        if self.rows:
            assert self.next_pos is not None and self.temps is not None and self.top_ps is not None
            next_pos, temps, top_ps = torch.cat([self.next_pos, next_pos]), torch.cat([self.temps, temps]), torch.cat([self.top_ps, top_ps])
        self.next_pos, self.temps, self.top_ps = next_pos, temps, top_ps
        assert self.logits is not None
        start = len(self.rows)
        for k, row in enumerate(rows):  # what a later identical prompt copies instead of prefilling
            row.prompt_logits = self.logits[start + k]
        self.rows += rows

    def _prefill(self, requests: list[Request]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One forward over the distinct prompts (left-padded): (cache, mask, last logits), one row per
        request. A prefix all of them share (a system prompt, tool schemas, a template's head) of at
        least `SHARED_PREFIX_MIN` tokens is run once, on one row, and the prompts' rest continues it."""
        import torch

        backend, device = self.backend, self.device
        slot: dict[tuple[int, ...], int] = {}
        for r in requests:
            slot.setdefault(tuple(r.prompt_ids), len(slot))
        unique = list(slot)
        shared = 0
        if len(unique) > 1:  # every prompt keeps at least its last token: its logits start the decoding
            shared = min(len(os.path.commonprefix(unique)), min(len(p) for p in unique) - 1)
        cache = None
        if shared >= SHARED_PREFIX_MIN:
            cache = self._shared_prefix(unique[0][:shared], len(unique))
        if cache is None:
            shared = 0
        suffixes = [p[shared:] for p in unique]
        width = max(len(p) for p in suffixes)
        ids = torch.full((len(unique), width), backend.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix) :] = torch.tensor(suffix)
            mask[i, width - len(suffix) :] = 1
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        # columns: [shared prefix][left padding][suffix], so each row's suffix continues the prefix
        seen = torch.cat([mask.new_ones((len(unique), shared)), mask], dim=1)
        out = self.model(input_ids=ids, attention_mask=seen, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        backend.stats.forward_calls += 1
        backend.stats.prefilled_rows += len(unique)
        backend.stats.prefilled_tokens += sum(len(s) for s in suffixes)
        logits = out.logits[:, -1, :].float()
        cache = out.past_key_values
        if shared:  # to the decoder's layout: [left padding][prompt], each row's tokens contiguous
            pads = torch.tensor([width - len(s) for s in suffixes], device=device)
            cols = torch.arange(shared + width, device=device)[None, :]
            mask = (cols >= pads[:, None]).long()
            in_prefix = (cols >= pads[:, None]) & (cols < pads[:, None] + shared)
            source = torch.where(in_prefix, cols - pads[:, None], cols)  # padding columns: any value, masked
            for layer in cache.layers:
                index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        if len(unique) < len(requests):
            index = torch.tensor([slot[tuple(r.prompt_ids)] for r in requests], device=device)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
        return cache, mask, logits

    def _shared_prefix(self, prefix: list[int], rows: int) -> Any:
        """The KV cache of `prefix`, computed once and repeated for `rows` rows; None when the model's
        cache is not made of plain full-attention layers (their tensors cannot be edited this way)."""
        import torch

        ids = torch.tensor([prefix], device=self.device)
        cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        self.backend.stats.forward_calls += 1
        self.backend.stats.prefilled_tokens += len(prefix)
        if not _editable(cache):
            return None
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        return cache

    def _prompt_of(self, j: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Running row j's prompt as a one-row part: its KV columns, mask, and logits after it.
        A row's tokens sit in contiguous columns (prompt, then what it generated)."""
        import torch

        assert self.mask is not None
        row = self.rows[j]
        first = int(self.mask[j].argmax())
        cols = slice(first, first + len(row.prompt))
        kv = [(layer.keys[j : j + 1, :, cols], layer.values[j : j + 1, :, cols]) for layer in self.cache.layers]
        assert row.prompt_logits is not None
        return kv, torch.ones((1, len(row.prompt)), dtype=self.mask.dtype, device=self.device), row.prompt_logits[None]

    def _concat(self, parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]]) -> None:
        """Stack parts (per-layer KV, mask, logits) along the batch, left-padded to one width."""
        import torch

        total = max(mask.shape[1] for _, mask, _ in parts)
        for i, layer in enumerate(self.cache.layers):
            layer.keys = torch.cat([_left_pad(kv[i][0], total, dim=2) for kv, _, _ in parts])
            layer.values = torch.cat([_left_pad(kv[i][1], total, dim=2) for kv, _, _ in parts])
        self.mask = torch.cat([_left_pad(mask, total, dim=1) for _, mask, _ in parts])
        self.logits = torch.cat([logits for _, _, logits in parts])

    def _step(self) -> None:
        """Sample one token for every row, release finished rows, run the next forward."""
        import torch

        assert self.mask is not None and self.next_pos is not None and self.logits is not None
        assert self.temps is not None and self.top_ps is not None
        backend = self.backend
        uniforms = torch.tensor([self._uniform(row) for row in self.rows])
        sampled = _sample(self.logits, self.temps, self.top_ps, uniforms.to(self.device))
        chosen = torch.log_softmax(self.logits, dim=-1).gather(1, sampled[:, None])[:, 0]
        backend.stats.generated_tokens += len(self.rows)
        keep: list[int] = []
        for j, (row, tok, logprob) in enumerate(zip(self.rows, sampled.tolist(), chosen.tolist())):
            row.tokens.append(tok)
            row.logprobs.append(logprob)
            if row.request.on_token is not None:
                self._report(row.request.loop, row.request.on_token, tok)
            if tok in row.stops:
                self._send(row.request, Generation(row.tokens, row.logprobs, "stop"))
            elif len(row.tokens) >= row.budget:
                self._send(row.request, Generation(row.tokens, row.logprobs, "length"))
            elif row.request.future.done():  # the caller went away (e.g. its HTTP client disconnected)
                pass
            else:
                keep.append(j)
        if len(keep) < len(self.rows):
            if not keep:
                self.rows, self.cache = [], None
                return
            self._select(keep)
            sampled = sampled[torch.tensor(keep, device=self.device)]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(
            input_ids=sampled[:, None],
            attention_mask=self.mask,
            position_ids=self.next_pos[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        backend.stats.forward_calls += 1
        self.next_pos = self.next_pos + 1
        self.logits = out.logits[:, -1, :].float()

    def _uniform(self, row: _Row) -> float:
        """The row's next U[0,1) draw, from its own generator when seeded, else the backend's. Drawn
        _DRAWS at a time: one torch call per row every _DRAWS steps instead of every step (the
        same numbers as one at a time)."""
        k = len(row.tokens) % _DRAWS
        if k == 0:
            import torch

            generator = row.generator if row.generator is not None else self.backend._rng
            row.draws = torch.rand(_DRAWS, generator=generator).tolist()
        return row.draws[k]

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`; drop leading columns none of them attends to."""
        import torch

        assert self.mask is not None and self.next_pos is not None and self.logits is not None
        assert self.temps is not None and self.top_ps is not None
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]
        self.temps, self.top_ps = self.temps[index], self.top_ps[index]
        self.rows = [self.rows[j] for j in keep]
        start = int(self.mask.any(dim=0).long().argmax())
        if start > 0 and self.can_join:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _editable(cache: Any) -> bool:
    """Whether joining, sharing and trimming may edit `cache`'s tensors: plain full-attention layers only."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _left_pad(t: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left along `dim` to `width`."""
    import torch

    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


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
