"""A loaded model's LM head gets a contiguous input when `logits_to_keep` slices the hidden states
(a strided slice makes torch.matmul copy the head's weight per row: 80x slower in bfloat16 on CPU),
and the logits are the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.models import load_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_input_is_contiguous_under_logits_to_keep(tiny_model: Path, dtype: torch.dtype) -> None:
    model, _ = load_model(tiny_model, dtype=dtype)
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=2).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -2:])
