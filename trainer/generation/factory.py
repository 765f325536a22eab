"""The one place generation backends are built, for `openrft train`, `eval` and `serve`.

`transformers`: generation from the model object itself (in training, the learner's live PEFT
model, so every step's update is seen at once). `vllm`: vLLM servers over HTTP (running ones at
`vllm.urls`, or started here from the model directory), which load each adapter from a directory
(`needs_adapter_dir`; see docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import ConfigError, GenerationConfig, VLLMConfig
from trainer.types import GenerationBackend

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trainer.learning.learner import Learner


def create_backend(kind: str, model_dir: str | Path, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase, *, generation: GenerationConfig,
                 vllm: VLLMConfig, lora_rank: int, dtype: str, seed: int, log_dir: Path) -> GenerationBackend:
    """The backend named by `kind` ("transformers" or "vllm"). `model` is the loaded model
    (transformers; None is fine for vllm); `dtype` the learner's ("float32", "bfloat16"), which
    started vLLM servers use when `vllm.dtype` is auto (so sampling and training logprobs match)."""
    if kind == "transformers":
        from trainer.generation.transformers_backend import TransformersBackend

        return TransformersBackend(model, tokenizer, max_batch_size=generation.max_batch_size,
                                   collect_window_s=generation.collect_window_s, seed=seed)
    if kind == "vllm":
        from trainer.generation.vllm_backend import VLLMBackend

        common: dict[str, Any] = dict(api_key=vllm.api_key, request_timeout_s=vllm.request_timeout_s,
                                      load_timeout_s=vllm.load_timeout_s)
        if vllm.urls:
            return VLLMBackend(vllm.urls, **common)
        return VLLMBackend.launch(
            str(model_dir), num_servers=vllm.num_servers, python=vllm.python, max_lora_rank=lora_rank,
            max_model_len=vllm.max_model_len, dtype=vllm.dtype if vllm.dtype != "auto" else dtype,
            extra_args=vllm.extra_args, log_dir=log_dir, startup_timeout_s=vllm.startup_timeout_s, **common,
        )
    raise ConfigError(f"backend: unknown backend {kind!r}")


async def sync_weights(backend: GenerationBackend, learner: Learner, run_dir: Path, step: int) -> None:
    """Tell the backend the weights changed. A backend serving its own copy of the model (vLLM:
    `needs_adapter_dir`) gets this step's adapter saved for it; the previous one is then removed."""
    if not backend.needs_adapter_dir:
        await backend.weights_updated(None)
        return
    sync = run_dir / "sync_adapter"
    adapter_dir = await asyncio.to_thread(learner.save_adapter, sync / f"step_{step:06d}")
    await backend.weights_updated(adapter_dir)
    for old in sync.glob("step_*"):
        if old != adapter_dir:
            shutil.rmtree(old, ignore_errors=True)
