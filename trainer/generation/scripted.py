"""`ScriptedBackend`: a generation backend that answers from a script instead of a model, for
tests and benchmarks that need exact, instant completions through the real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.types import Generation, SamplingParams

Script = Callable[[list[int], SamplingParams], "str | list[int]"]


class ScriptedBackend:
    """A backend that answers from a script instead of sampling: `script(prompt_ids, params)`
    returns the completion as text (encoded, then eos appended) or as token ids (used as is).
    For tests and demos that need a model to make exact tool calls.

    With `model`, the logprobs are that model's temperature-1 logprobs of the scripted tokens
    (teacher forcing), so a learner sees the numbers a real sampler would have recorded;
    without one they are 0.0. max_tokens and stop tokens apply as in sampling."""

    needs_adapter_dir = False
    lock = None
    stats = None

    def __init__(self, tokenizer: Any, script: Script, *, model: Any = None) -> None:
        self.tokenizer, self.script, self.model = tokenizer, script, model
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        out = self.script(list(prompt_ids), params)
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer.encode(out, add_special_tokens=False) + [eos] if isinstance(out, str) else list(out)
        if not ids:
            raise ValueError("the script returned an empty completion")
        stops = {eos, *params.stop_token_ids}
        finish = "length"
        for k, tok in enumerate(ids[: params.max_tokens]):
            if tok in stops:
                ids, finish = ids[: k + 1], "stop"
                break
        else:
            ids = ids[: params.max_tokens]
        self.prompts.append(list(prompt_ids))
        logprobs = await asyncio.to_thread(self._logprobs, prompt_ids, ids) if self.model is not None else [0.0] * len(ids)
        return Generation(ids, logprobs, finish)

    def _logprobs(self, prompt_ids: list[int], ids: list[int]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                logits = self.model(torch.tensor([list(prompt_ids) + ids], device=device)).logits[0].float()
        finally:
            self.model.train(was_training)
        logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        return logp.gather(1, torch.tensor(ids, device=device)[:, None])[:, 0].tolist()

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Nothing to reload."""

    def close(self) -> None:
        """Nothing to stop."""
