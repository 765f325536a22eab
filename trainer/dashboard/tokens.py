"""The token dump: what each step trained, compactly (RUN_DIR/tokens/step_NNNNNN.jsonl).

One line per trained sample: its rollout id, advantage, the token ids, the spans where the loss mask
is 1 (`[start, end)` pairs) and the sampling logprob of each masked token, in order (4 decimals).
Tokens outside the spans (prompt, tool results) were not trained. The trainer writes it; the
dashboard reads it back with `expand`. One owner for the format, both directions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.types import Sample


def tokens_path(run_dir: Path, step: int) -> Path:
    return run_dir / "tokens" / f"step_{step:06d}.jsonl"


def compact(sample: Sample) -> dict[str, Any]:
    """One sample as a token-dump record."""
    spans: list[list[int]] = []
    logprobs: list[float] = []
    for i, m in enumerate(sample.loss_mask):
        if not m:
            continue
        if spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
        logprobs.append(round(float(sample.old_logprobs[i]), 4))
    return {"rollout_id": sample.rollout_id, "advantage": round(float(sample.advantage), 6),
            "ids": list(sample.input_ids), "spans": spans, "logprobs": logprobs}


def write_tokens(run_dir: Path, step: int, samples: Iterable[Sample]) -> None:
    path = tokens_path(run_dir, step)
    path.parent.mkdir(exist_ok=True)
    with path.open("w") as fh:
        for sample in samples:
            fh.write(json.dumps(compact(sample), separators=(",", ":")) + "\n")


def expand(record: dict[str, Any]) -> tuple[list[int], list[int], list[float | None]]:
    """(ids, loss mask, sampling logprob or None) per token of a token-dump record."""
    ids = [int(i) for i in record.get("ids") or []]
    mask = [0] * len(ids)
    logprobs: list[float | None] = [None] * len(ids)
    sampled = iter(record.get("logprobs") or [])
    for start, end in record.get("spans") or []:
        for i in range(int(start), min(int(end), len(ids))):
            mask[i] = 1
            logprobs[i] = next(sampled, None)
    return ids, mask, logprobs
