"""Prompts that share a long head (a system prompt, tool schemas) are prefilled as that head once plus
each prompt's rest, and decode exactly as if each were prefilled whole."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from trainer.generation import TransformersBackend
from trainer.generation.decoder import SHARED_PREFIX_MIN
from trainer.models import build_tiny_model, load_model
from trainer.types import SamplingParams

SYSTEM = "You are a careful calculator. Think about the digits, then answer with the number alone, nothing else."


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return load_model(build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))


def _prompts(tokenizer, count: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """A shared system prompt, then user turns of different lengths (so the rests are left-padded)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": "What is " + " + ".join(str(7 * j + k) for j in range(k + 1)) + "?"}],
            add_generation_prompt=True, return_dict=False,
        )
        for k in range(count)
    ]


async def test_shared_head_is_prefilled_once_and_decodes_as_whole_prompts(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    prompts = _prompts(tokenizer, 6)
    head = len(os.path.commonprefix(prompts))
    assert head >= SHARED_PREFIX_MIN and len({len(p) for p in prompts}) > 1
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    params = [SamplingParams(max_tokens=12, temperature=0.0)] * 3 + [SamplingParams(max_tokens=12, seed=s) for s in range(3)]
    alone = [await backend.generate(p, q) for p, q in zip(prompts, params)]  # one prompt: nothing to share
    assert backend.stats.prefilled_tokens == sum(len(p) for p in prompts)

    before = backend.stats.prefilled_tokens
    together = await asyncio.gather(*(backend.generate(p, q) for p, q in zip(prompts, params)))
    assert backend.stats.batch_sizes[-1] == 6
    assert backend.stats.prefilled_tokens - before == head + sum(len(p) - head for p in prompts)
    for got, want in zip(together, alone):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
    backend.close()


async def test_logprobs_after_a_shared_head_match_a_full_forward_pass(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    prompts = _prompts(tokenizer, 4)
    gens = await asyncio.gather(*(backend.generate(p, SamplingParams(max_tokens=16, temperature=1.2, seed=i))
                                  for i, p in enumerate(prompts)))
    assert backend.stats.prefilled_tokens < sum(len(p) for p in prompts)  # the head ran once
    for prompt, gen in zip(prompts, gens):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + gen.token_ids])).logits[0, :-1].float(), dim=-1)
        ref = logp[len(prompt) - 1 :].gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(gen.logprobs), atol=1e-4)
    backend.close()


async def test_group_members_and_late_joiners_after_a_shared_head(loaded) -> None:  # type: ignore[no-untyped-def]
    """Identical prompts inside a shared-head prefill, and requests joining that batch mid-decode."""
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.0)
    prompts = _prompts(tokenizer, 4)
    first = [(prompts[0], SamplingParams(max_tokens=100, temperature=0.0))]
    group = [(prompts[1], SamplingParams(max_tokens=10, seed=s)) for s in range(3)] + \
            [(p, SamplingParams(max_tokens=8, seed=9)) for p in prompts[2:]]
    alone = [await backend.generate(p, q) for p, q in first + group]
    calls = backend.stats.forward_calls
    running = asyncio.ensure_future(backend.generate(*first[0]))
    while backend.stats.forward_calls < calls + 4:
        await asyncio.sleep(0.001)
    late = await asyncio.gather(*(backend.generate(p, q) for p, q in group))
    for got, want in zip([await running, *late], alone):
        assert got.token_ids == want.token_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
    backend.close()
