"""What a heavy command sets up for its run: torch's CPU threads, seeds, peak memory."""

from __future__ import annotations

import contextlib
import random
import resource
from collections.abc import Iterator

from trainer.config import TrainConfig


@contextlib.contextmanager
def torch_threads(config: TrainConfig) -> Iterator[None]:
    """torch's CPU threads while a run lasts: `config.threads`, else (on CPU) one less than the
    CPUs, at least 1. The previous setting is restored after (train() may be called in-process)."""
    import os

    import torch

    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    elif config.device != "cuda" and not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
