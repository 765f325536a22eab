"""Data-parallel learner: one step under `torchrun --nproc-per-node 2` (gloo, CPU, real processes)
leaves the same LoRA weights as one process on the same samples, for token_mean and
seq_mean_token_mean (normalised over the whole step, not per rank), with the KL term, micro-batches
and shared prefixes on; both ranks hold the same weights; and without the gradient sum (the
negative control, `Ranks.reduce` made a no-op in tests/ranks_step.py) the result is far off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ranks_step import (
    CASES,
    init_lora,
    lora_state,
    make_config,
    make_samples,
    run_under_torchrun,
)
from trainer.learning.learner import Learner

ATOL = 1e-5  # fp32; a step moves weights by about lr = 1e-2


@pytest.fixture(scope="module")
def two_ranks(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ranks")
    run_under_torchrun(tiny_model, out)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def one_process(tiny_model: Path, agg: str) -> dict[str, torch.Tensor]:
    learner = Learner.from_config(make_config(tiny_model, agg))
    init_lora(learner)
    learner.train_step(make_samples(learner.model.config.vocab_size))
    return lora_state(learner)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("agg", sorted({agg for agg, reduce in CASES if reduce}))
def test_two_ranks_step_equals_one_process(agg: str, tiny_model: Path,
                                           two_ranks: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    rank0, rank1 = (r[f"{agg}/sum"] for r in two_ranks)
    assert max_diff(rank0, rank1) == 0.0  # the replicas stay identical
    alone = one_process(tiny_model, agg)
    init = Learner.from_config(make_config(tiny_model, agg))
    init_lora(init)
    assert max_diff(lora_state(init), alone) > 100 * ATOL  # the step moved the weights
    assert max_diff(rank0, alone) < ATOL


def test_without_the_gradient_sum_the_ranks_differ(tiny_model: Path,
                                                   two_ranks: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    alone = one_process(tiny_model, "token_mean")
    rank0, rank1 = (r["token_mean/alone"] for r in two_ranks)
    assert max_diff(rank0, alone) > 100 * ATOL
    assert max_diff(rank1, alone) > 100 * ATOL
    assert max_diff(rank0, rank1) > 100 * ATOL
