"""The loss variants of `grpo.policy_loss` (ppo_clip, gspo, cispo) and truncated importance sampling,
each checked against a hand computation on a small batch (values and gradients); and each variant
moving a real tiny model's logprobs along the advantage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.config import GrpoConfig
from trainer.learning.grpo import policy_loss


def _run(lp: list[list[float]], old: list[list[float]], adv: list[float], mask: list[list[float]],
         weights: list[float], **kw: object) -> tuple[float, list[list[float]], dict[str, float]]:
    logprobs = torch.tensor(lp, requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.tensor(old), torch.tensor(adv), torch.tensor(mask),
                              torch.tensor(weights), clip_eps_low=0.2, clip_eps_high=0.3, **kw)
    loss.backward()
    return loss.item(), logprobs.grad.tolist(), stats


def test_gspo_uses_one_ratio_per_sequence() -> None:
    # seq 0: log-ratios 0.1, 0.2, 0.0 -> s0 = exp(0.1), advantage +1, inside the band
    # seq 1: log-ratios 0.5, 0.5 (third token masked) -> s1 = exp(0.5) = 1.649, advantage -1:
    #        a negative advantage is not clipped above, so l = s1 on each of its 2 tokens
    old = [[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]]
    lp = [[-0.9, -0.8, -1.0], [-1.5, -1.5, 5.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    w = [1 / 6, 1 / 4]  # seq_mean_token_mean: 1 / (n_seq * tokens_i)
    loss, grad, stats = _run(lp, old, [1.0, -1.0], mask, w, kind="gspo")
    s0, s1 = math.exp(0.1), math.exp(0.5)
    assert loss == pytest.approx(-s0 * 3 / 6 + s1 * 2 / 4, rel=1e-6)  # = mean over sequences of -min(s A, clip(s) A)
    # d/dlp_t of w_i * n_i * (-s_i A_i) = -w_i * A_i * s_i (each token moves the mean by 1/n_i)
    assert grad[0] == pytest.approx([-s0 / 6] * 3, rel=1e-5)
    assert grad[1] == pytest.approx([s1 / 4, s1 / 4, 0.0], rel=1e-5)
    assert stats["clipped"] == 0 and stats["ratio"] == pytest.approx(3 * s0 + 2 * s1, rel=1e-6)
    # with advantage +1 the same s1 is clipped at 1.3 for the whole sequence: no gradient there
    loss, grad, stats = _run(lp, old, [1.0, 1.0], mask, w, kind="gspo")
    assert grad[1] == [0.0, 0.0, 0.0] and stats["clipped"] == 2
    assert loss == pytest.approx(-s0 * 3 / 6 - 1.3 * 2 / 4, rel=1e-6)


def test_gspo_differs_from_token_level_clipping() -> None:
    # log-ratios +0.4 and -0.4: token-level, the first is clipped (A > 0); the sequence ratio is 1
    lp, old = [[0.4, -0.4]], [[0.0, 0.0]]
    _, grad_ppo, st_ppo = _run(lp, old, [1.0], [[1, 1]], [0.5], kind="ppo_clip")
    _, grad_gspo, st_gspo = _run(lp, old, [1.0], [[1, 1]], [0.5], kind="gspo")
    assert grad_ppo[0] == pytest.approx([0.0, -0.5 * math.exp(-0.4)])
    assert grad_gspo[0] == pytest.approx([-0.5, -0.5])  # -w * A * s with s = exp(mean(0.4, -0.4)) = 1
    assert st_ppo["clipped"] == 1 and st_gspo["clipped"] == 0


def test_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    # ratios 1.5 (above 1 + 0.3) and 1.0, advantage +1, weight 1
    lp, old = [[-1.0, -2.0]], [[-1.0 - math.log(1.5), -2.0]]
    loss, grad, stats = _run(lp, old, [1.0], [[1, 1]], [1.0], kind="cispo")
    # l_t = -sg(clip(r_t)) * A * logp_t: -(1.3 * -1) - (1.0 * -2) = 3.3; gradient -clip(r_t) * A
    assert loss == pytest.approx(3.3, rel=1e-6)
    assert grad[0] == pytest.approx([-1.3, -1.0], rel=1e-6)
    assert stats["clipped"] == 1
    # the same tokens under ppo_clip: the clipped one gets no gradient at all
    _, grad, _ = _run(lp, old, [1.0], [[1, 1]], [1.0], kind="ppo_clip")
    assert grad[0] == pytest.approx([0.0, -1.0], rel=1e-6)
    # negative advantage, ratio 0.5 (below 1 - 0.2): weight 0.8, gradient +0.8
    _, grad, stats = _run([[math.log(0.5)]], [[0.0]], [-1.0], [[1]], [1.0], kind="cispo")
    assert grad[0] == pytest.approx([0.8], rel=1e-6) and stats["clipped"] == 1


def test_truncated_importance_sampling_caps_the_ratio() -> None:
    # a stale / mismatched token: ratio 3 against the sampler, advantage -1
    lp, old = [[math.log(3.0), 0.0]], [[0.0, 0.0]]
    loss, grad, stats = _run(lp, old, [-1.0], [[1, 1]], [1.0], kind="ppo_clip", tis_cap=None)
    assert loss == pytest.approx(3.0 + 1.0) and grad[0] == pytest.approx([3.0, 1.0])
    loss, grad, stats = _run(lp, old, [-1.0], [[1, 1]], [1.0], kind="ppo_clip", tis_cap=2.0)
    assert loss == pytest.approx(2.0 + 1.0) and grad[0] == pytest.approx([0.0, 1.0])
    assert stats["truncated"] == 1 and stats["ratio"] == pytest.approx(4.0)  # the ratio stat is the raw one
    # cispo: the weight is the truncated ratio, then clipped
    _, grad, _ = _run(lp, old, [-1.0], [[1, 1]], [1.0], kind="cispo", tis_cap=1.1)
    assert grad[0] == pytest.approx([1.1, 1.0])


@pytest.mark.parametrize("kind", ["gspo", "cispo"])
def test_each_variant_moves_logprobs_along_the_advantage(tiny_model: Path, kind: str) -> None:
    from tests.test_grpo_loss import _samples, make_learner

    learner = make_learner(tiny_model, epochs=3, policy_loss=kind)
    assert learner.grpo == GrpoConfig(epochs=3, policy_loss=kind)
    samples = _samples(learner, [(4, 5), (4, 5)])
    before = learner.logprobs(samples)
    stats = learner.train_step(samples)
    after = learner.logprobs(samples)
    assert sum(after[1]) > sum(before[1]) and sum(after[0]) < sum(before[0])
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and math.isfinite(stats["loss"])
