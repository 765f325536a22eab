"""A step's groups -> the learner's batch: group-relative advantages, then training sequences from
the recorded calls of the groups that teach something; and the step's reward metrics."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from trainer.config import TrainConfig
from trainer.learning.grpo import group_advantages
from trainer.learning.samples import rollout_samples
from trainer.types import GroupResult, Sample, StepBatch


def group_status(group: GroupResult, min_group_size: int) -> str:
    """"dropped" (too few finished rollouts), "all_equal" (rewards tie: zero advantage) or "trained"."""
    finished = group.finished
    if len(finished) < min_group_size:
        return "dropped"
    rewards = [r.reward for r in finished]
    return "all_equal" if max(rewards) - min(rewards) < 1e-9 else "trained"


def build_batch(groups: Sequence[GroupResult], config: TrainConfig) -> StepBatch:
    """Advantages per group, then training sequences from the recorded calls."""
    samples: list[Sample] = []
    trained_ids: set[str] = set()
    trained = dropped = all_equal = 0
    for group in groups:
        status = group_status(group, config.rollout.min_group_size)
        if status == "dropped":
            dropped += 1
            continue
        if status == "all_equal":
            all_equal += 1
            continue
        trained += 1
        finished = group.finished
        rewards = [r.reward for r in finished]
        for r, adv in zip(finished, group_advantages(rewards, config.grpo.scale_rewards)):
            samples += rollout_samples(r.calls, adv, r.rollout_id, config.grpo.mask_truncated)
            trained_ids.add(r.rollout_id)
    return StepBatch(samples, trained, dropped, all_equal, trained_ids)


def reward_metrics(groups: Sequence[GroupResult]) -> dict[str, float]:
    rewards = [r.reward for g in groups for r in g.finished]
    total = sum(len(g.rollouts) for g in groups)
    return {
        "reward/mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "pass_rate": sum(r >= 1.0 - 1e-6 for r in rewards) / len(rewards) if rewards else 0.0,
        "rollouts/finished": float(len(rewards)),
        "rollouts/failed": float(total - len(rewards)),
    }
