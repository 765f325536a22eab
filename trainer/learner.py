"""The LoRA learner: a peft-wrapped causal LM, AdamW, and the GRPO update over micro-batches.

The same model object is served by the generation backend between updates (no weight copy), so
the learner leaves it in eval mode and under no special state when a step ends.

Logprobs are computed padding-aware: sequences are sorted by length so each micro-batch pads only
to its own longest sequence, and the LM head runs only on positions from the micro-batch's first
sampled token onward (`logits_to_keep`), never on the long shared prompt. logprob = logit of the
target - logsumexp(logits): the full log-softmax tensor is never materialised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import GrpoConfig, LoraConfig, OptimConfig, TrainConfig
from trainer.grpo import policy_loss, sequence_weights
from trainer.samples import Sample

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    first: int  # first target position with a sampled token in this micro-batch
    targets: torch.Tensor  # [B, T - first]  token ids at positions first..T-1
    mask: torch.Tensor  # [B, T - first]
    old_logprobs: torch.Tensor  # [B, T - first]
    advantages: torch.Tensor  # [B]
    weights: torch.Tensor  # [B]


class Learner:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        lora: LoraConfig,
        optim: OptimConfig,
        grpo: GrpoConfig,
        max_tokens: int,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        from trainer.models import load_model

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.grpo = grpo
        self.max_tokens = max_tokens
        base, self.tokenizer = load_model(model_dir, device=self.device, dtype=self.dtype)
        peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, peft_config)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
            foreach=True,
        )
        self.max_grad_norm = optim.max_grad_norm

    @classmethod
    def from_config(cls, config: TrainConfig) -> Learner:
        return cls(
            config.model, lora=config.lora, optim=config.optim, grpo=config.grpo,
            max_tokens=config.sampling.max_tokens, device=config.device, dtype=config.dtype,
        )

    # --- batching -------------------------------------------------------------------------

    def _collate(self, samples: list[Sample], weights: list[float]) -> _Batch:
        T = max(len(s.input_ids) for s in samples)
        B = len(samples)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.float32)
        old = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            ids[i, :n] = torch.tensor(s.input_ids)
            attn[i, :n] = 1
            mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
            old[i, :n] = torch.tensor(s.old_logprobs, dtype=torch.float32)
        mask[:, 0] = 0.0  # the first token has no preceding position to predict it from
        nonzero = mask.any(dim=0).nonzero()
        first = int(nonzero[0]) if len(nonzero) else T - 1
        dev = self.device
        return _Batch(
            input_ids=ids.to(dev), attention_mask=attn.to(dev), first=first,
            targets=ids[:, first:].to(dev), mask=mask[:, first:].to(dev), old_logprobs=old[:, first:].to(dev),
            advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=dev),
            weights=torch.tensor(weights, dtype=torch.float32, device=dev),
        )

    def _logprobs(self, batch: _Batch) -> torch.Tensor:
        """[B, T - first]: logprob of each target token (temperature 1, raw logits)."""
        T = batch.input_ids.shape[1]
        keep = T - batch.first + 1  # positions first-1 .. T-1; the last predicts past the end
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep, use_cache=False)
        logits = out.logits[:, :-1].float()
        picked = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    def _micro_batches(self, samples: list[Sample], weights: list[float]) -> list[_Batch]:
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
        size = self.grpo.micro_batch_size
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        return [self._collate([samples[i] for i in c], [weights[i] for i in c]) for c in chunks]

    @torch.no_grad()
    def logprobs(self, samples: list[Sample], *, adapter: bool = True) -> list[list[float]]:
        """Per-sample logprobs of the masked (sampled) tokens, in sample order. For tests/metrics."""
        self.model.eval()
        result: list[list[float]] = []
        for s in samples:
            batch = self._collate([s], [0.0])
            if adapter:
                lp = self._logprobs(batch)
            else:
                with self.model.disable_adapter():
                    lp = self._logprobs(batch)
            result.append(lp[0][batch.mask[0] > 0].tolist())
        return result

    # --- the update -----------------------------------------------------------------------

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One GRPO update (grpo.epochs optimizer steps) on one step's samples."""
        samples = [s for s in samples if s.num_loss_tokens > 0]
        if not samples:
            return {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "tokens": 0.0}
        g = self.grpo
        counts = [sum(s.loss_mask[1:]) for s in samples]
        weights = sequence_weights(counts, g.loss_agg, self.max_tokens)
        batches = self._micro_batches(samples, weights)

        ref: list[torch.Tensor | None] = [None] * len(batches)
        if g.kl_coef > 0:  # reference logprobs once per step, adapter off, no graph
            with torch.no_grad(), self.model.disable_adapter():
                ref = [self._logprobs(b) for b in batches]

        self.model.train()
        totals: dict[str, float] = {}
        losses, grad_norms = [], []
        try:
            for epoch in range(g.epochs):
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for b, r in zip(batches, ref):
                    lp = self._logprobs(b)
                    loss, stats = policy_loss(
                        lp, b.old_logprobs, b.advantages, b.mask, b.weights,
                        clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high,
                        ref_logprobs=r, kl_coef=g.kl_coef,
                    )
                    loss.backward()
                    step_loss += loss.item()
                    for k, v in stats.items():
                        key = f"{k}@0" if epoch == 0 else k
                        totals[key] = totals.get(key, 0.0) + v
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], self.max_grad_norm
                )
                self.optimizer.step()
                losses.append(step_loss)
                grad_norms.append(float(norm))
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        tokens = totals["tokens@0"]
        return {
            "loss": sum(losses) / len(losses),
            "kl": totals["kl@0"] / tokens,
            "clip_frac": (totals["clipped@0"] + totals.get("clipped", 0.0)) / (tokens * g.epochs),
            "ratio": totals["ratio@0"] / tokens,
            # sampling vs training logprob mismatch on the first pass (before any update)
            "logprob_abs_diff": totals["abs_logprob_diff@0"] / tokens,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "tokens": tokens,
        }

    # --- persistence ----------------------------------------------------------------------

    def save_adapter(self, out_dir: str | Path) -> Path:
        """A standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

        Only LoRA weights are written: the base embeddings are never trained here, so they are left
        out even when `lm_head` / `embed_tokens` carry LoRA (peft would copy the full matrices)."""
        out = Path(out_dir)
        self.model.save_pretrained(out, save_embedding_layers=False)
        return out

    def load_adapter_weights(self, adapter_dir: str | Path) -> None:
        """Load saved LoRA weights into the live model (same LoRA config)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS), device=self.device)
        result = set_peft_model_state_dict(self.model, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise RuntimeError(f"{adapter_dir}: adapter does not match this LoRA config (missing {missing[:3]} ...)")

    def state_dict(self) -> dict[str, Any]:
        """Optimizer + RNG state (the adapter weights are saved separately, as PEFT)."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
