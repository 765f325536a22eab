"""TransformersBackend: concurrent requests share one batch, batched greedy equals one at a
time, recorded logprobs equal a plain forward pass, and it serves the live peft model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trainer.generation import TransformersBackend
from trainer.types import GenerationBackend, SamplingParams
from trainer.models import build_tiny_model, load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def loaded(tiny: Path):  # type: ignore[no-untyped-def]
    return load_model(tiny)


def _prompts(tokenizer, count: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Prompts of different lengths, so left padding really happens."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is " + " + ".join(str(j) for j in range(k + 1)) + "?"}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for k in range(count)
    ]


async def test_concurrent_batched_greedy_matches_one_at_a_time(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    assert isinstance(backend, GenerationBackend)
    prompts = _prompts(tokenizer, 8)
    assert len({len(p) for p in prompts}) > 1
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    batched = await asyncio.gather(*(backend.generate(p, greedy) for p in prompts))
    assert backend.stats.batches == 1 and backend.stats.batch_sizes == [8]
    assert backend.stats.forward_calls == 12  # prefill + 11 decode steps, all rows together
    singles = [await backend.generate(p, greedy) for p in prompts]
    assert backend.stats.batch_sizes == [8] + [1] * 8
    for b, s in zip(batched, singles):
        assert b.token_ids == s.token_ids
        assert b.finish_reason == s.finish_reason == "length"
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(s.logprobs), atol=1e-4)
    backend.close()


async def test_late_requests_join_the_running_batch(loaded) -> None:  # type: ignore[no-untyped-def]
    """Continuous batching: requests arriving mid-decode join it (their cache left-padded into
    the running one), rows leave as they finish, and every result equals decoding it alone."""
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.0)
    prompts = _prompts(tokenizer, 6)
    greedy = [SamplingParams(max_tokens=n, temperature=0.0) for n in (120, 3, 25, 8, 30, 5)]  # the first outlasts the joins
    singles = [await backend.generate(p, g) for p, g in zip(prompts, greedy)]
    start, joined = backend.stats.batches, backend.stats.joined
    long = asyncio.ensure_future(backend.generate(prompts[0], greedy[0]))
    calls = backend.stats.forward_calls
    while backend.stats.forward_calls < calls + 5:  # the first request is decoding
        await asyncio.sleep(0.001)
    late = [asyncio.ensure_future(backend.generate(p, g)) for p, g in zip(prompts[1:], greedy[1:])]
    short = await late[0]  # 3 tokens: back while the long row still runs
    assert not long.done()
    results = [await long, short, *[await f for f in late[1:]]]
    assert backend.stats.batches == start + 1 and backend.stats.joined == joined + 5
    for got, alone in zip(results, singles):
        assert got.token_ids == alone.token_ids and got.finish_reason == alone.finish_reason
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-4)
    backend.close()


async def test_a_group_sharing_a_prompt_is_prefilled_once(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    shared, other = _prompts(tokenizer, 2)
    params = [SamplingParams(max_tokens=10, seed=s) for s in range(4)]
    alone = [await backend.generate(shared, p) for p in params] + [await backend.generate(other, params[0])]
    prefilled = backend.stats.prefilled_rows
    together = await asyncio.gather(*(backend.generate(shared, p) for p in params), backend.generate(other, params[0]))
    assert backend.stats.batch_sizes[-1] == 5 and backend.stats.prefilled_rows == prefilled + 2
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in together[:4]}) > 1  # the shared cache is not shared state
    backend.close()


async def test_late_group_members_copy_the_running_prompt(loaded) -> None:  # type: ignore[no-untyped-def]
    """A request whose prompt is already running (a group member arriving late) joins without
    a prefill: the running row's prompt KV and logits are copied."""
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.0)
    shared, other = _prompts(tokenizer, 2)
    params = [SamplingParams(max_tokens=n, seed=s) for s, n in enumerate((120, 25, 20, 15))]  # the first outlasts the joins
    alone = [await backend.generate(shared, p) for p in params] + [await backend.generate(other, params[1])]
    prefilled, calls = backend.stats.prefilled_rows, backend.stats.forward_calls
    first = asyncio.ensure_future(backend.generate(shared, params[0]))
    while backend.stats.forward_calls < calls + 4:
        await asyncio.sleep(0.001)
    late = await asyncio.gather(*(backend.generate(shared, p) for p in params[1:]), backend.generate(other, params[1]))
    assert [g.token_ids for g in [await first, *late]] == [g.token_ids for g in alone]
    for got, want in zip([await first, *late], alone):
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
    assert backend.stats.prefilled_rows == prefilled + 2  # `shared` once, `other` once
    backend.close()


async def test_logprobs_match_a_full_forward_pass(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer)
    prompts = _prompts(tokenizer, 3)
    params = SamplingParams(max_tokens=16, temperature=1.3, top_p=0.9, seed=1)
    gens = await asyncio.gather(*(backend.generate(p, params) for p in prompts))
    for prompt, gen in zip(prompts, gens):
        ids = torch.tensor([prompt + gen.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        ref = logp[len(prompt) - 1 :].gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
        # temperature-1 raw logprobs, whatever temperature/top_p sampled them
        assert torch.allclose(ref, torch.tensor(gen.logprobs), atol=1e-4)
    backend.close()


async def test_per_row_stop_and_max_tokens(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    prompt = _prompts(tokenizer, 1)[0]
    free = await backend.generate(prompt, SamplingParams(max_tokens=10, temperature=0))
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    short, stopped, full = await asyncio.gather(
        backend.generate(prompt, SamplingParams(max_tokens=2, temperature=0)),
        backend.generate(prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,))),
        backend.generate(prompt, SamplingParams(max_tokens=10, temperature=0)),
    )
    assert backend.stats.batch_sizes[-1] == 3
    assert (short.token_ids, short.finish_reason) == (free.token_ids[:2], "length")
    assert (stopped.token_ids, stopped.finish_reason) == (free.token_ids[: first + 1], "stop")
    assert full.token_ids == free.token_ids
    backend.close()


async def test_seeded_sampling_does_not_depend_on_batch_mates(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer, collect_window_s=0.2)
    prompts = _prompts(tokenizer, 4)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=123)
    alone = await backend.generate(prompts[0], params)
    together = await asyncio.gather(
        backend.generate(prompts[0], params),
        *(backend.generate(p, SamplingParams(max_tokens=5, temperature=1.0)) for p in prompts[1:]),
    )
    assert together[0].token_ids == alone.token_ids
    other = await backend.generate(prompts[0], SamplingParams(max_tokens=16, temperature=1.0, seed=124))
    assert other.token_ids != alone.token_ids
    tiny_nucleus = await backend.generate(prompts[0], SamplingParams(max_tokens=8, top_p=1e-6, seed=5))
    greedy = await backend.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0))
    assert tiny_nucleus.token_ids == greedy.token_ids
    backend.close()


async def test_serves_the_live_peft_model_and_restores_train_mode(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    peft_model.train()
    backend = TransformersBackend(peft_model, tokenizer)
    prompt = _prompts(tokenizer, 1)[0]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    before = await backend.generate(prompt, greedy)
    with backend.lock:  # results go out as rows finish; the batch restores train mode under the lock
        assert peft_model.training
    again = await backend.generate(prompt, greedy)
    assert again.token_ids == before.token_ids  # dropout was off while generating
    with torch.no_grad():  # an "optimizer step" on the live object, no reload, no copy
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 2.0)
    await backend.weights_updated(None)
    after = await backend.generate(prompt, greedy)
    assert after.token_ids != before.token_ids
    backend.close()


async def test_bad_requests_fail_clearly(loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    backend = TransformersBackend(model, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        await backend.generate([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await backend.generate([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
