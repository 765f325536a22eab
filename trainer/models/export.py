"""`openrft export --model DIR --adapter DIR --out DIR [--merge]`: hand a trained adapter to
other software.

Without `--merge` the adapter directory (standard PEFT: adapter_config.json +
adapter_model.safetensors) is copied to OUT with a README.md saying how to load it in vLLM,
peft and `openrft serve`. With `--merge` the LoRA deltas are folded into the base weights
and OUT is an ordinary transformers model directory (weights, config, tokenizer, chat
template) that any tool loading `AutoModelForCausalLM` can use, with no peft at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


class ExportError(ValueError):
    """The inputs cannot be exported; the message names the path and what is wrong."""


def _adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise ExportError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are exported")
    return config


def _check_model(model: Path) -> None:
    if not (model / "config.json").is_file():
        raise ExportError(f"--model {model}: not a transformers model directory (no config.json)")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory; choose a new path")


def _max_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def adapter_readme(model: Path, out: Path, config: dict[str, Any], name: str) -> str:
    """How to load the exported adapter in vLLM, peft and openrft."""
    rank = int(config.get("r", 8))
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    max_rank = _max_lora_rank(rank)
    return f"""# LoRA adapter `{name}` (trained with openrft)

A standard PEFT LoRA adapter: `adapter_config.json` + `adapter_model.safetensors`.

- base model: `{model}`
- rank {rank}, alpha {config.get("lora_alpha")}, target modules: {targets}

## vLLM

Serve the base model with LoRA enabled and this adapter registered under a name; requests
that ask for `"model": "{name}"` get the adapter:

```bash
vllm serve {model} --enable-lora --lora-modules {name}={out} --max-lora-rank {max_rank}
# or: python -m vllm.entrypoints.openai.api_server --model {model} --enable-lora --lora-modules {name}={out} --max-lora-rank {max_rank}
```

`--max-lora-rank` must be at least the adapter's rank ({rank}). To load it into a server that is
already running, start that server with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and
`--enable-lora --max-lora-rank {max_rank}`, then:

```bash
curl -X POST http://localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \\
     -d '{{"lora_name": "{name}", "lora_path": "{out}"}}'
```

## peft

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{model}")
model = AutoModelForCausalLM.from_pretrained("{model}")
model = PeftModel.from_pretrained(model, "{out}")
model = model.merge_and_unload()  # optional: plain transformers weights, faster inference
```

## openrft

```bash
openrft serve --model {model} --adapter {out}          # OpenAI-compatible /v1/chat/completions
openrft export --model {model} --adapter {out} --out merged --merge   # a merged model directory
```
"""


def export_adapter(model: Path, adapter: Path, out: Path) -> Path:
    """Copy the PEFT adapter to `out` and write its README.md."""
    _check_model(model)
    config = _adapter_config(adapter)
    _check_out(out)
    missing = [f for f in ADAPTER_FILES if not (adapter / f).is_file()]
    if missing:
        raise ExportError(f"--adapter {adapter}: missing {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    for file in adapter.iterdir():
        if file.is_file() and file.name != "README.md":
            shutil.copy2(file, out / file.name)
    name = out.resolve().name
    (out / "README.md").write_text(adapter_readme(model.resolve(), out.resolve(), config, name))
    return out


def export_merged(model: Path, adapter: Path, out: Path) -> Path:
    """Write base + adapter, merged, as a transformers model directory with its tokenizer."""
    from trainer.models.loading import load_policy

    _check_model(model)
    _adapter_config(adapter)
    _check_out(out)
    merged, tokenizer = load_policy(model, adapter, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# Merged model (openrft)\n\nBase model `{model.resolve()}` with the LoRA adapter "
        f"`{adapter.resolve()}` merged into its weights. Load it like any transformers model "
        "(`AutoModelForCausalLM.from_pretrained`), serve it with `vllm serve` or `openrft serve --model`.\n"
    )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft export", description="write an adapter, or a merged model with --merge")
    parser.add_argument("--model", required=True, type=Path, help="the base model directory the adapter was trained on")
    parser.add_argument("--adapter", required=True, type=Path, help="a PEFT adapter directory, e.g. RUN_DIR/adapter")
    parser.add_argument("--out", required=True, type=Path, help="a new (or empty) directory to write")
    parser.add_argument("--merge", action="store_true", help="write a merged model directory instead of the adapter")
    args = parser.parse_args(argv)
    try:
        path = (export_merged if args.merge else export_adapter)(args.model, args.adapter, args.out)
    except (ExportError, FileNotFoundError) as exc:
        print(f"openrft export: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
