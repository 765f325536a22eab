"""Supervised fine-tuning of the LoRA adapter: next-token cross-entropy on the assistant tokens only.

The examples come in already tokenized (`trainer/gateway/chat.py: render_conversation`), with a loss
mask that is 1 exactly where RFT would have sampled: SFT teaches the tokens RFT later samples and
trains. The model, optimizer and adapter format are the Learner's, so an SFT adapter is a plain PEFT
adapter that `train` (`init_adapter`), `eval` and `serve` load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.learning.learner import Learner


@dataclass
class SftExample:
    input_ids: list[int]
    loss_mask: list[int]
    where: str  # file:line of the conversation


def _micro_batches(examples: list[SftExample], size: int) -> list[list[SftExample]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # pad each micro-batch to its own longest
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _masked_nll(learner: Learner, chunk: list[SftExample]) -> tuple[torch.Tensor, int]:
    """(sum of the negative log-likelihood over the chunk's assistant tokens, their count)."""
    width = max(len(e.input_ids) for e in chunk)
    ids = torch.full((len(chunk), width), learner.pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, e in enumerate(chunk):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = torch.tensor(e.loss_mask)
        attention[row, :n] = 1
    ids, mask, attention = ids.to(learner.device), mask.to(learner.device), attention.to(learner.device)
    targets, keep = ids[:, 1:], mask[:, 1:].bool()
    if learner._head_is_plain():  # the LM head only on the positions that predict an assistant token
        hidden = learner._body(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
        logits = learner._head(hidden[keep])
    else:
        logits = learner.model(input_ids=ids, attention_mask=attention).logits[:, :-1][keep]
    nll = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return nll, int(keep.sum().item())


def sft_step(learner: Learner, batch: list[SftExample], micro_batch_size: int) -> dict[str, float]:
    """One optimizer step on `batch`: the mean NLL over all its assistant tokens (every token weighs
    the same, whatever micro-batch it falls in)."""
    tokens = sum(sum(e.loss_mask[1:]) for e in batch)
    if tokens == 0:
        raise ValueError("a batch without assistant tokens")
    learner.model.train()
    learner.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    try:
        for chunk in _micro_batches(batch, micro_batch_size):
            nll, _ = _masked_nll(learner, chunk)
            (nll / tokens).backward()
            total += float(nll.item())
        params = [p for p in learner.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, learner.max_grad_norm))
        learner.optimizer.step()
    finally:
        learner.model.eval()
    return {"loss": total / tokens, "tokens": float(tokens), "grad_norm": grad_norm}


@torch.no_grad()
def mean_nll(learner: Learner, examples: list[SftExample], micro_batch_size: int = 8) -> float:
    """The mean NLL over the assistant tokens of `examples`, without training."""
    total, tokens = 0.0, 0
    for chunk in _micro_batches(examples, micro_batch_size):
        nll, n = _masked_nll(learner, chunk)
        total, tokens = total + float(nll.item()), tokens + n
    return total / max(tokens, 1)
