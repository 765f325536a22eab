"""The GRPO objective, in one place, top to bottom.

1. Advantages. Each task is sampled `group_size` times (a group). A rollout's advantage is its
   reward minus the group's mean reward, divided by the group's std (sample std, as TRL does)
   when `scale_rewards="std"` (GRPO), or left unscaled when `scale_rewards="none"` (Dr. GRPO,
   which removes the std's bias toward too easy / too hard tasks). All tokens of a rollout share
   its advantage; a group whose rewards are all equal has zero advantage everywhere and is skipped
   by the trainer before it gets here.

2. The importance ratio against the behaviour policy. For each sampled completion token t,
   r_t = exp(logp_theta(t) - logp_old(t)), where logp_old is the logprob the generation backend
   recorded when it sampled the token (temperature 1, raw logits): the sampler's own policy, which
   with pipelined steps (async.max_staleness > 0) may be a few versions behind the learner, and
   with vLLM differs from the learner's numerics. Truncated importance sampling (`tis_cap` = C)
   bounds what that mismatch can do: the ratio entering the surrogate is min(r_t, C), so a token
   the learner now finds much likelier than the sampler did weighs at most C and gets no gradient
   through the ratio (`logprob_abs_diff` measures the mismatch; without it a negative advantage
   times an unbounded ratio is an unbounded loss). None switches it off.

3. The per-token surrogate (`policy_loss`), with A the advantage, r the (truncated) ratio and
   clip(x) = clamp(x, 1 - eps_low, 1 + eps_high):
   - ppo_clip:  l_t = -min(r_t * A, clip(r_t) * A)                       (PPO / GRPO / DAPO
                "clip-higher": eps_high may exceed eps_low)
   - gspo:      s_i = exp(mean over seq i's sampled tokens of (logp_theta - logp_old)), the
                sequence-level ratio (GSPO, Zheng et al. 2025), truncated at C like r_t;
                l_t = -min(s_i * A, clip(s_i) * A) on every sampled token of sequence i. With
                loss_agg seq_mean_token_mean that is GSPO's mean over sequences exactly.
   - cispo:     l_t = -sg(clip(r_t)) * A * logp_theta(t)   (CISPO, MiniMax-M1 2025): the clipped
                ratio is a stop-gradient weight, so every token keeps its gradient (PPO clipping
                zeroes the gradient of clipped tokens); its value is not zero at r = 1, only its
                gradient matters.

4. Optional KL to the base model (adapter disabled), k3 estimator (Schulman):
   kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (>= 0, unbiased for KL(pi || ref)).
   The per-token loss adds kl_coef * kl_t. With kl_coef = 0 the reference pass is never run.

5. Aggregation (`loss_agg`). Only sampled completion tokens count (mask = 1): prompts, tool
   results, chat-template glue and completions dropped by `mask_truncated` are masked. Each
   sequence i gets a weight w_i so that the loss is sum_i w_i * sum_t mask_it * l_it:
   - token_mean:               w_i = 1 / (all masked tokens of the step)     (DAPO)
   - seq_mean_token_mean:      w_i = 1 / (n_seq * tokens of sequence i)      (original GRPO)
   - seq_mean_token_sum_norm:  w_i = 1 / (n_seq * max_tokens)                (Dr. GRPO)
   Because the weights are fixed for the whole step before micro-batching, the gradients summed
   over micro-batches equal the gradient of the full-batch loss exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScaleRewards = Literal["std", "none"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
PolicyLoss = Literal["ppo_clip", "gspo", "cispo"]


def group_advantages(rewards: list[float], scale: ScaleRewards = "std", eps: float = 1e-6) -> list[float]:
    """Advantages of one group's rewards (step 1)."""
    n = len(rewards)
    mean = sum(rewards) / n
    centered = [r - mean for r in rewards]
    if scale == "none" or n < 2:
        return centered
    std = math.sqrt(sum(c * c for c in centered) / (n - 1))
    return [c / (std + eps) for c in centered]


def sequence_weights(token_counts: list[int], agg: LossAgg, max_tokens: int) -> list[float]:
    """Per-sequence loss weights w_i (step 5) for one optimizer step's sequences."""
    n_seq = len(token_counts)
    if agg == "token_mean":
        total = sum(token_counts)
        return [1.0 / total if total else 0.0] * n_seq
    if agg == "seq_mean_token_mean":
        return [1.0 / (n_seq * c) if c else 0.0 for c in token_counts]
    if agg == "seq_mean_token_sum_norm":
        return [1.0 / (n_seq * max_tokens)] * n_seq
    raise ValueError(f"unknown loss aggregation {agg!r}")


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] current policy logprob of each target token
    old_logprobs: torch.Tensor,  # [B, T] logprob recorded at sampling time (the behaviour policy)
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T] 1.0 on sampled completion tokens
    weights: torch.Tensor,  # [B] sequence weights from sequence_weights()
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    kind: PolicyLoss = "ppo_clip",
    tis_cap: float | None = None,
    ref_logprobs: torch.Tensor | None = None,  # [B, T] base model (adapter off); None when kl_coef = 0
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch's share of the step loss (steps 2-5), plus sums for the step's metrics.

    The returned stats are sums over masked tokens (`tokens`, `clipped`, `truncated`, `kl`, `ratio`,
    `abs_logprob_diff`), so micro-batches add up; divide by `tokens` for means.
    """
    adv = advantages.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    if kind == "gspo":  # one ratio per sequence: the mean log-ratio over its sampled tokens
        seq_log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(seq_log_ratio).expand_as(log_ratio)
    else:
        ratio = torch.exp(log_ratio)
    raw_ratio = ratio
    if tis_cap is not None:  # step 2: truncated importance sampling
        ratio = torch.clamp(ratio, max=tis_cap)
    bounded = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)

    if kind == "cispo":
        per_token = -bounded.detach() * adv * logprobs
        clipped_tokens = bounded != ratio
    elif kind in ("ppo_clip", "gspo"):
        unclipped, clipped = ratio * adv, bounded * adv
        per_token = -torch.minimum(unclipped, clipped)
        clipped_tokens = clipped < unclipped
    else:
        raise ValueError(f"unknown policy loss {kind!r}")

    kl = None
    if ref_logprobs is not None and kl_coef > 0:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * kl

    loss = (per_token * mask * weights.unsqueeze(1)).sum()

    with torch.no_grad():
        stats = {
            "tokens": float(mask.sum()),
            "clipped": float((clipped_tokens.float() * mask).sum()),
            "truncated": float(((raw_ratio > tis_cap).float() * mask).sum()) if tis_cap is not None else 0.0,
            "ratio": float((raw_ratio * mask).sum()),
            "abs_logprob_diff": float((log_ratio.abs() * mask).sum()),
            "kl": float((kl * mask).sum()) if kl is not None else 0.0,
        }
    return loss, stats
