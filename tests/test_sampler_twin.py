"""The pipelined sampler: a twin of the learner's PEFT model that shares its base weights and keeps its
own LoRA weights, a swap of those weights that runs between two decode steps of a running batch (never
in the middle of one), and completions tagged with the policy version that started them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import torch

from tests.test_grpo_loss import make_learner
from trainer.generation.transformers_backend import TransformersBackend
from trainer.generation.versioned import VersionedBackend, shadow_model
from trainer.types import SamplingParams


def test_twin_shares_the_base_and_owns_its_adapter(tiny_model: Path) -> None:
    learner = make_learner(tiny_model)
    model = learner.model
    twin, sync = shadow_model(model)
    mine = dict(model.named_parameters())
    for name, q in twin.named_parameters():
        if mine[name].requires_grad:  # LoRA: a copy of its own
            assert q is not mine[name] and q.data_ptr() != mine[name].data_ptr() and not q.requires_grad
        else:  # base weights: the very same tensors, no second copy in memory
            assert q is mine[name]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the learner's update
        moved, before = model(input_ids=ids).logits, twin(input_ids=ids).logits
        assert not torch.allclose(moved, before)  # the twin still samples the old policy
        sync()
        assert torch.allclose(twin(input_ids=ids).logits, moved)


def test_swap_runs_between_decode_steps_and_versions_tag_completions(tiny_model: Path) -> None:
    learner = make_learner(tiny_model)
    twin, sync = shadow_model(learner.model)
    inner = TransformersBackend(twin, learner.tokenizer, collect_window_s=0.0, seed=0)
    backend = VersionedBackend(inner, sync, version=3)
    seen: list[tuple[bool, int]] = []

    def swap() -> None:  # what the worker is doing when the swap runs
        seen.append((inner.lock.locked(), inner.stats.forward_calls))
        assert threading.current_thread().name == "openrft-generate"  # on the worker, inside the batch
        sync()

    async def scenario() -> tuple[list[int], int]:
        params = SamplingParams(max_tokens=48, temperature=1.0, stop_token_ids=())
        job = asyncio.ensure_future(backend.generate([5, 6, 7], params))
        while inner.stats.forward_calls < 3 and not job.done():  # the batch is decoding
            await asyncio.sleep(0.001)
        await inner.run_between_steps(swap)
        gen = await job
        after = await backend.generate([5, 6, 7], SamplingParams(max_tokens=2))
        return [gen.policy_version, after.policy_version], len(gen.token_ids)

    try:
        learner.model.eval()
        versions, n_tokens = asyncio.run(scenario())
    finally:
        inner.close()
    [(locked, forwards)] = seen
    assert locked and 3 <= forwards < inner.stats.forward_calls  # mid-batch, between two forwards
    assert n_tokens > 0 and versions == [3, 3]  # run_between_steps alone does not bump the version


def test_weights_updated_bumps_the_version_after_the_swap(tiny_model: Path) -> None:
    learner = make_learner(tiny_model)
    twin, sync = shadow_model(learner.model)
    inner = TransformersBackend(twin, learner.tokenizer, collect_window_s=0.0, seed=0)
    backend = VersionedBackend(inner, sync, version=0)
    ids = torch.tensor([[5, 6, 7, 8]])

    async def scenario() -> list[int | None]:
        first = await backend.generate([5, 6], SamplingParams(max_tokens=2))
        with torch.no_grad():
            for p in learner.model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        await backend.weights_updated(None)  # idle backend: the swap runs at once
        second = await backend.generate([5, 6], SamplingParams(max_tokens=2))
        return [first.policy_version, second.policy_version]

    try:
        assert asyncio.run(scenario()) == [0, 1]
    finally:
        inner.close()
    with torch.no_grad():
        assert torch.allclose(twin(input_ids=ids).logits, learner.model(input_ids=ids).logits)
    assert backend.lock is None and backend.busy_s() > 0
