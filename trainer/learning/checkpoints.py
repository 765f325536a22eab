"""Checkpoints of a run: `RUN_DIR/checkpoints/step_N/{adapter/, trainer_state.pt}`, written
atomically, the newest one found again by `--resume`, and the logs of steps after it forgotten."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import LoraConfig
from trainer.data import TaskStream

if TYPE_CHECKING:
    from trainer.learning.learner import Learner

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob("step_*[0-9]") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, learner: Learner, stream: TaskStream) -> Path:
    """Written to a temporary dir then renamed: a crash never leaves a half checkpoint."""
    import torch

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    learner.save_adapter(tmp / "adapter")
    state = {"step": step, "data": stream.state_dict(), **learner.state_dict()}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest = run_dir / "adapter"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(final / "adapter", latest)
    return final


def start_from_adapter(learner: Learner, adapter_dir: str | Path, lora: LoraConfig) -> None:
    """Load `init_adapter` (e.g. `openrft sft`'s output) into the learner's fresh LoRA: training goes
    on from those weights. ValueError when its LoRA shape differs from the config's `lora`."""
    from trainer.models.loading import adapter_config

    saved = adapter_config(adapter_dir)
    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules)
    theirs = saved.get("target_modules")
    theirs = sorted(theirs) if isinstance(theirs, list) else theirs
    wrong = [f"{name}: adapter {a!r}, config {b!r}" for name, a, b in (
        ("lora.rank", saved.get("r"), lora.rank), ("lora.alpha", saved.get("lora_alpha"), lora.alpha),
        ("lora.target_modules", theirs, targets)) if a != b]
    if wrong:
        raise ValueError(f"init_adapter {adapter_dir}: its LoRA differs from this config's ({'; '.join(wrong)}); "
                         "set `lora` to match the adapter")
    learner.load_adapter_weights(adapter_dir)


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity (dropped) for a blank line or one torn by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def truncate_logs(run_dir: Path, step: int) -> None:
    """Forget what steps after `step` wrote (they are redone after a resume)."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if _logged_step(line) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    for dump in [*(run_dir / "rollouts").glob("step_*.jsonl"), *(run_dir / "tokens").glob("step_*.jsonl")]:
        if int(dump.stem.split("_")[1]) > step:
            dump.unlink()


def groups_trained(run_dir: Path) -> float:
    """Groups trained by the steps metrics.jsonl holds (a resumed run's earlier steps)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0.0
    return sum(json.loads(line).get("groups/trained", 0.0) for line in metrics.read_text().splitlines() if line.strip())
