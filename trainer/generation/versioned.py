"""Generation for pipelined steps: a sampler that keeps its own adapter weights, tags every
completion with the policy version that sampled it, and takes each new version between two decode
steps.

In the synchronous loop the transformers backend samples from the learner's own model object and the
learner holds the backend's lock while it updates: generation and learning take turns. To overlap
them, `shadow_model` builds a second model object that shares every frozen tensor of the learner's
(the base weights: no second copy in memory) and holds its own copy of the trainable ones (the LoRA
weights, a few MB). The sampler generates from it while the learner trains the original; after each
optimizer step `VersionedBackend.weights_updated` copies the new LoRA weights into it, on the
backend's worker between two decode steps (`TransformersBackend.run_between_steps`), and the policy
version goes up by one. A completion is tagged with the version current when its request started,
so a swap during its decoding makes its recorded staleness an upper bound; every token's recorded
logprob is the one it was really sampled with, which is what the loss's ratio needs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.types import Generation, GenerationBackend, SamplingParams

if TYPE_CHECKING:
    import torch


def shadow_model(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[], None]]:
    """(twin, sync): a copy of `model` sharing its frozen parameters and buffers, with its own copy of the
    trainable ones; `sync()` copies `model`'s current trainable weights into the twin."""
    import torch

    shared: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
    shared.update({id(b): b for b in model.buffers()})
    twin = copy.deepcopy(model, shared)
    twin.eval()
    own = dict(twin.named_parameters())
    pairs = [(p, own[name]) for name, p in model.named_parameters() if p.requires_grad]
    for _, q in pairs:
        q.requires_grad_(False)

    @torch.no_grad()
    def sync() -> None:
        for p, q in pairs:
            q.copy_(p)

    return twin, sync


class VersionedBackend:
    """A backend wrapper for pipelined steps: counts policy versions, tags each `Generation` with the
    version that started sampling it, swaps weights between decode steps, and measures its busy time
    (so the trainer can say how much generation overlapped learning). `lock` is None: the learner
    trains its own model object and never waits for generation."""

    needs_adapter_dir = False
    lock = None

    def __init__(self, inner: GenerationBackend, sync: Callable[[], None], version: int = 0) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.version = version
        self._sync = sync
        self._listeners: list[Callable[[int], None]] = []
        self._active = 0
        self._since = 0.0
        self._busy = 0.0

    def on_version(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        version = self.version
        if self._active == 0:
            self._since = time.perf_counter()
        self._active += 1
        try:
            out = await self.inner.generate(prompt_ids, params)
        finally:
            self._active -= 1
            if self._active == 0:
                self._busy += time.perf_counter() - self._since
        out.policy_version = version
        return out

    def busy_s(self) -> float:
        """Seconds during which any generation ran, since the start (monotonic)."""
        return self._busy + (time.perf_counter() - self._since if self._active else 0.0)

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """After an optimizer step (`adapter_dir` None): the twin takes the new weights, the version goes
        up. With a directory (a resumed run's checkpoint, already loaded into the learner): the twin takes
        those weights and the version stays the step the run resumes from."""
        run_between = getattr(self.inner, "run_between_steps", None)
        if run_between is None:
            raise RuntimeError(f"{type(self.inner).__name__} cannot swap weights between decode steps")
        await run_between(self._sync)
        if adapter_dir is not None:
            return
        self.version += 1
        for listener in self._listeners:
            listener(self.version)

    def close(self) -> None:
        self.inner.close()
