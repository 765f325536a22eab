"""Loading a local model directory, with or without a trained LoRA adapter: the one place
`openrft train`, `eval`, `serve` and `export` load models from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(
    model_dir: str | Path, *, device: str = "cpu", dtype: "torch.dtype | None" = None
) -> "tuple[PreTrainedModel, PreTrainedTokenizerBase]":
    """Load a local transformers causal-LM directory and its tokenizer onto `device`.

    `dtype` defaults to float32 on CPU and bfloat16 on CUDA (when supported)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); build one with `openrft model tiny --out {path}`")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _contiguous_input(module: "torch.nn.Module", args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The LM head's input, made contiguous. `logits_to_keep` hands the head a strided slice of the
    hidden states; torch.matmul cannot fold that [B, T, H] view into one [B*T, H] matrix product, so
    it copies the weight once per row into a batched product: on CPU a [8, 1, 576] slice against
    SmolLM2's [49152, 576] head took 818 ms in bfloat16 (9.7 ms contiguous) and 84 ms in float32 (21)."""
    return (args[0].contiguous(), *args[1:])


def load_tokenizer(model_dir: str | Path) -> "PreTrainedTokenizerBase":
    """A model directory's tokenizer alone (generation elsewhere, e.g. on vLLM servers)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """A PEFT adapter directory's adapter_config.json, or FileNotFoundError naming the directory."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    return json.loads(path.read_text())


def load_policy(
    model_dir: str | Path, adapter_dir: str | Path | None = None, *, device: str = "cpu",
    dtype: "torch.dtype | None" = None, merge: bool = True,
) -> "tuple[PreTrainedModel, PreTrainedTokenizerBase]":
    """The base model with a PEFT adapter (if any) applied, in eval mode, and its tokenizer.
    `merge` folds the adapter into the base weights (faster inference; the adapter cannot be
    switched off afterwards)."""
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_config(adapter_dir)
        model = PeftModel.from_pretrained(model, Path(adapter_dir))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer
