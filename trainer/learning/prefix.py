"""Prefix sharing for the learner: the rollouts of a GRPO group share their prompt, so a
micro-batch runs each shared prefix once and fans its KV cache out to the rows that continue it.
`plan_prefix_runs` groups samples into such runs; the two caches keep the prefix pass and the
suffix pass exact under gradient checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from trainer.types import Sample


@dataclass
class MicroBatch:
    """One micro-batch. Without a shared prefix, `input_ids` are whole sequences (start = 0).
    With one, each row is the suffix of its sequence after its run's shared prefix; the prefixes
    (one row per run, left padded) are run once and their KV cache is fanned out to the rows."""

    input_ids: torch.Tensor  # [B, S] right padded
    attention_mask: torch.Tensor  # [B, S]
    cut: int  # logits are needed from suffix position `cut` on (it predicts position cut + 1)
    targets: torch.Tensor  # [B, S - cut - 1]  the tokens at suffix positions cut+1 .. S-1
    mask: torch.Tensor  # [B, S - cut - 1]
    old_logprobs: torch.Tensor  # [B, S - cut - 1]
    advantages: torch.Tensor  # [B]
    weights: torch.Tensor  # [B]
    prefix_ids: torch.Tensor | None = None  # [R, L] left padded shared prefixes
    prefix_mask: torch.Tensor | None = None  # [R, L]
    row_run: torch.Tensor | None = None  # [B] which prefix each row continues
    start: torch.Tensor | None = None  # [B] absolute position of each row's first suffix token


def first_loss_position(sample: Sample) -> int:
    """Index of the first sampled token (>= 1: position 0 has nothing before it)."""
    for i in range(1, len(sample.loss_mask)):
        if sample.loss_mask[i]:
            return i
    return len(sample.loss_mask)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_prefix_runs(samples: list[Sample]) -> list[tuple[list[int], int]]:
    """Group samples into runs sharing a token prefix that holds no sampled token: the rollouts of
    a GRPO group share their prompt. Returns (sample indices, shared length L) per run; L is at
    most each member's first sampled position - 1, so every logit the loss needs is computed in
    the per-row suffix pass. A sample joins the current run only if it shares the run's whole
    prefix (so one odd sample never shrinks a group's sharing)."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].input_ids)
    runs: list[tuple[list[int], int]] = []
    for i in order:
        s = samples[i]
        cap = first_loss_position(s) - 1
        if runs:
            members, shared = runs[-1]
            head = samples[members[0]].input_ids
            together = min(_common_prefix(head, s.input_ids), cap)
            if len(members) == 1:
                together = min(together, first_loss_position(samples[members[0]]) - 1)
                if together >= 1:
                    runs[-1] = (members + [i], together)
                    continue
            elif together >= shared:
                members.append(i)
                continue
        runs.append(([i], cap))
    return runs


class PrefixWriter(DynamicCache):
    """The prefix pass's cache. A layer replayed by gradient checkpointing in the backward pass
    writes its keys again: they are the ones already held (the prefix has no past), so it answers
    them without appending."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class PrefixCache(DynamicCache):
    """The shared prefixes' keys and values, one row per suffix row. The suffix pass reads them but
    never extends them, so a layer replayed by gradient checkpointing in the backward pass sees the
    same cache as in the forward pass."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
