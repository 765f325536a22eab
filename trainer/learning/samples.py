"""Gateway call records -> training sequences.

Training uses exactly the token ids the gateway fed the model and the ids it sampled, never a
re-tokenization of text. A sequence is `input_ids` with a `loss_mask` that is 1 only on tokens the
model sampled, and the sampling logprob of each of those tokens (`old_logprobs`, 0.0 elsewhere),
all aligned position by position with `input_ids`.

Multi-turn: when a call's prompt starts with the previous call's prompt + completion (the usual
case: the env appended a tool result or a user turn), the calls merge into one sequence; the new
prompt tokens (tool results, template glue) are masked. When the prompt does not extend it (the env
rewrote history, or the chat template re-renders the assistant turn differently), the call starts a
new sequence. Either way every sequence of a rollout carries the rollout's advantage.

`mask_truncated` (DAPO's overlong filtering): a completion cut by max_tokens (finish_reason
"length") stays in the sequence as context but its tokens are masked out of the loss. A sequence
keeps the oldest policy version that sampled one of its calls (`policy_version`, pipelined steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from trainer.types import Sample, extends


class CallLike(Protocol):
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    # also read when present: finish_reason (str), policy_version (int | None)


def _check(call: CallLike) -> None:
    if len(call.completion_ids) != len(call.logprobs):
        raise ValueError(
            f"call record has {len(call.completion_ids)} completion tokens but {len(call.logprobs)} logprobs"
        )


def build_sequences(calls: Sequence[CallLike], mask_truncated: bool = False) -> list[Sample]:
    """One rollout's calls (in order) -> its training sequences (advantage 0, set by the caller)."""
    samples: list[Sample] = []
    current: Sample | None = None
    for call in calls:
        _check(call)
        if not call.completion_ids:
            continue  # nothing sampled, nothing to learn from
        prompt = call.prompt_ids
        if current is not None and extends(prompt, current.input_ids):
            new_prompt = prompt[len(current.input_ids):]
        else:
            current = Sample(input_ids=[], loss_mask=[], old_logprobs=[])
            samples.append(current)
            new_prompt = list(prompt)
        current.input_ids += new_prompt + list(call.completion_ids)
        trained = not (mask_truncated and getattr(call, "finish_reason", "stop") == "length")
        current.loss_mask += [0] * len(new_prompt) + [int(trained)] * len(call.completion_ids)
        version = getattr(call, "policy_version", None)
        if version is not None and (current.policy_version is None or version < current.policy_version):
            current.policy_version = version
        current.old_logprobs += [0.0] * len(new_prompt) + [float(x) for x in call.logprobs]
    return samples


def rollout_samples(calls: Sequence[CallLike], advantage: float, rollout_id: str = "",
                    mask_truncated: bool = False) -> list[Sample]:
    """The rollout's sequences, each carrying the rollout's advantage."""
    samples = build_sequences(calls, mask_truncated)
    for s in samples:
        s.advantage = advantage
        s.rollout_id = rollout_id
    return samples
