"""`openrft sft`'s config (`SftConfig`): the supervised warm start's knobs, read like the training
config (a YAML/JSON file + `--set key=value`, unknown keys are errors naming the key). Its `lora`
and `optim` sections are the training config's; a training config's `init_adapter` continues the
adapter it produces."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from trainer.config import LoraConfig, OptimConfig, _Section, load_config


class SftConfig(_Section):
    """`openrft sft`: LoRA supervised fine-tuning on conversations (trainer/learning/sft.py)."""

    model: str = Field(description="local transformers model directory")
    dataset: str = Field(description="JSONL of conversations in the OpenAI fine-tuning format (messages, optional tools)")
    epochs: int = Field(default=3, ge=1, description="passes over the dataset")
    batch_size: int = Field(default=8, ge=1, description="conversations per optimizer step")
    micro_batch_size: int = Field(default=4, ge=1, description="sequences per forward/backward pass")
    max_seq_len: int = Field(default=2048, ge=8, description="longer conversations are an error naming their line")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-4))
    checkpoint_every: int = Field(default=0, ge=0, description="optimizer steps between checkpoints; 0 = only the end")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default as in train)")
    run_dir: str = "runs/sft"
    progress: bool = True


def load_sft_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SftConfig:
    """`openrft sft`'s config, read the same way as `load_config`."""
    config: SftConfig = load_config(path, overrides, schema=SftConfig)
    return config
