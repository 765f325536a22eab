"""`grpo.mask_truncated`: completions cut by max_tokens (finish_reason "length") stay as context but
leave the loss; the oldest sampling policy version of a sequence's calls is kept."""

from __future__ import annotations

from trainer.config import TrainConfig
from trainer.learning.batch import build_batch
from trainer.learning.samples import build_sequences
from trainer.types import CallRecord, GroupResult, RolloutResult
from env_sdk.models import Status


def _call(prompt: list[int], completion: list[int], finish: str, version: int | None = None) -> CallRecord:
    return CallRecord(messages=[], tools=None, prompt_ids=prompt, completion_ids=completion,
                      logprobs=[-1.0] * len(completion), response={}, finish_reason=finish, policy_version=version)


def test_a_truncated_turn_is_masked_but_kept_as_context() -> None:
    first = _call([1, 2], [3, 4], "length", version=5)
    second = _call([1, 2, 3, 4, 9], [6, 7], "stop", version=4)
    [kept] = build_sequences([first, second], mask_truncated=False)
    assert kept.loss_mask == [0, 0, 1, 1, 0, 1, 1]
    [masked] = build_sequences([first, second], mask_truncated=True)
    assert masked.input_ids == kept.input_ids
    assert masked.loss_mask == [0, 0, 0, 0, 0, 1, 1]
    assert masked.old_logprobs == kept.old_logprobs
    assert masked.policy_version == 4  # the oldest sampler of its tokens


def _rollout(rid: str, reward: float, finish: str) -> RolloutResult:
    return RolloutResult(rollout_id=rid, group=0, task_index=0, status=Status(code=100, message="done"), reward=reward,
                         calls=[_call([1, 2], [3, 4, 5], finish)])


def test_build_batch_drops_truncated_completions_from_the_loss() -> None:
    group = GroupResult(0, 0, [_rollout("a", 1.0, "stop"), _rollout("b", 0.0, "length")])
    config = TrainConfig(model="m", dataset="d", envs=[{"url": "http://x"}], group_size=2)
    batch = build_batch([group], config)
    assert [s.num_loss_tokens for s in batch.samples] == [3, 3]
    config.grpo.mask_truncated = True
    batch = build_batch([group], config)
    # the advantage still comes from both rewards; the cut completion just teaches nothing
    assert [s.num_loss_tokens for s in batch.samples] == [3, 0]
    assert batch.samples[0].advantage > 0 > batch.samples[1].advantage
