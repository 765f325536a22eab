"""`openrft sft CONFIG [--set k=v ...]`: LoRA supervised fine-tuning on JSONL conversations (the warm
start before RFT).

Each row is an OpenAI fine-tuning conversation (`messages` with `tool_calls` and `tool` turns,
optional `tools`). It is rendered with the model's chat template and the gateway's Hermes tool-call
markup (`render_conversation`), and the loss falls on the assistant tokens only: the tokens RFT
would sample there. A row the template cannot render, or longer than `max_seq_len`, is an error
naming its file:line.

Run directory: config.yaml, metrics.jsonl (one line per optimizer step), checkpoints/step_N/adapter
(every `checkpoint_every` steps), adapter/ (the final PEFT adapter: `init_adapter` of a training
config, or `--adapter` of eval and serve).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.commands.runtime import seed_everything, torch_threads
from trainer.config import ConfigError, GrpoConfig, save_config
from trainer.data import DatasetError, load_conversations
from trainer.sft_config import SftConfig, load_sft_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from trainer.learning.sft import SftExample


class SftError(RuntimeError):
    """An SFT run cannot start; the message says why (and where, for a bad row)."""


def tokenize_dataset(config: SftConfig, tokenizer: PreTrainedTokenizerBase) -> list[SftExample]:
    """Every conversation of the dataset as an SftExample, or SftError naming the bad rows' file:line."""
    from trainer.gateway.chat import ChatFormatError, render_conversation
    from trainer.learning.sft import SftExample

    examples: list[SftExample] = []
    problems: list[str] = []
    for row in load_conversations(config.dataset):
        try:
            ids, mask = render_conversation(tokenizer, row.messages, row.tools)
        except ChatFormatError as exc:
            problems.append(f"{row.where}: {exc}")
            continue
        if len(ids) > config.max_seq_len:
            problems.append(f"{row.where}: {len(ids)} tokens, over max_seq_len ({config.max_seq_len})")
            continue
        examples.append(SftExample(ids, mask, row.where))
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SftError("\n".join(problems[:10]) + more)
    return examples


def sft(config: SftConfig) -> Path:
    """Fine-tune as `config` says; return the run directory (the adapter is RUN_DIR/adapter)."""
    from tqdm import tqdm

    from trainer.learning.learner import Learner
    from trainer.learning.sft import mean_nll, sft_step
    from trainer.models.loading import load_tokenizer

    run_dir = Path(config.run_dir)
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        raise SftError(f"run_dir {run_dir} already holds a run (metrics.jsonl); set another run_dir")
    with torch_threads(config):  # type: ignore[arg-type]  # reads only .threads and .device
        examples = tokenize_dataset(config, load_tokenizer(config.model))  # bad rows fail before the model loads
        seed_everything(config.seed)
        learner = Learner(config.model, lora=config.lora, optim=config.optim, grpo=GrpoConfig(), max_tokens=1,
                          device=config.device, dtype=config.dtype)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        rng = random.Random(config.seed)
        per_epoch = -(-len(examples) // config.batch_size)
        bar = tqdm(total=config.epochs * per_epoch, desc="sft", unit="step", disable=not config.progress,
                   dynamic_ncols=True)
        step = 0
        try:
            with (run_dir / "metrics.jsonl").open("a") as metrics:
                for epoch in range(1, config.epochs + 1):
                    order = list(examples)
                    rng.shuffle(order)
                    for start in range(0, len(order), config.batch_size):
                        t0 = time.perf_counter()
                        stats = sft_step(learner, order[start:start + config.batch_size], config.micro_batch_size)
                        step += 1
                        line = {"step": step, "epoch": epoch, **stats, "time/step": time.perf_counter() - t0}
                        metrics.write(json.dumps(line) + "\n")
                        metrics.flush()
                        if config.checkpoint_every and step % config.checkpoint_every == 0:
                            learner.save_adapter(run_dir / "checkpoints" / f"step_{step:06d}" / "adapter")
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", epoch=epoch)
                        bar.update(1)
        finally:
            bar.close()
        final = mean_nll(learner, examples, config.micro_batch_size)
        with (run_dir / "metrics.jsonl").open("a") as metrics:
            metrics.write(json.dumps({"step": step, "final/mean_nll": final}) + "\n")
        tmp = run_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        learner.save_adapter(tmp)
        shutil.rmtree(run_dir / "adapter", ignore_errors=True)
        tmp.rename(run_dir / "adapter")
    return run_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft sft", description="LoRA supervised fine-tuning on JSONL conversations")
    parser.add_argument("config", nargs="?", help="YAML or JSON config (see SftConfig in trainer/sft_config.py); or only --set")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set epochs=2 optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_sft_config(args.config, args.overrides)
        run_dir = sft(config)
    except (ConfigError, DatasetError, SftError, FileNotFoundError) as exc:
        print(f"openrft sft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("openrft sft: interrupted", file=sys.stderr)
        return 130
    print(f"run directory: {run_dir}\nadapter: {run_dir / 'adapter'}")
    return 0

