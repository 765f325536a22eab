"""Local model directories without a model hub.

`build_tiny_model` makes a tiny randomly initialised Qwen2 model with a byte-level BPE
tokenizer trained offline on a small built-in corpus and a ChatML chat template that
understands `tools` (Qwen2.5 conventions: tools listed in the system turn, assistant tool
calls as `<tool_call>{json}</tool_call>`, tool results as `<tool_response>` inside a user
turn). It is for tests and quick runs: it builds in about a second and is fully
determined by its seed.

`openrft model tiny --out DIR` is the CLI front (trainer/commands/model.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.models.templates import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, MARKUP_TOKENS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _corpus(seed: int) -> list[str]:
    """A small built-in corpus: chat-ish text, digits and arithmetic, JSON and tool markup."""
    rng = random.Random(seed)
    words = (
        "the a an and or of to in is it you that he was for on are with as I his they be at one have this "
        "from by hot word but what some we can out other were all there when up use your how said each she "
        "which do their time if will way about many then them write would like so these her long make thing "
        "see him two has look more day could go come did number sound no most people my over know water than "
        "call first who may down side been now find answer question please thanks hello hi sure result tool "
        "function weather city search file read list sum add total value name arguments error done final"
    ).split()
    lines: list[str] = []
    for _ in range(600):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ":"]))
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"What is {a} + {b}? The answer is {a + b}.")
        lines.append(f"{a} * {b} = {a * b}; {a} - {b} = {a - b}")
    for _ in range(200):
        args = {rng.choice(words): rng.choice([rng.randint(-50, 5000), rng.choice(words), True, None])}
        name = "_".join(rng.sample(words, 2))
        call = json.dumps({"name": name, "arguments": args})
        lines.append(f"{IM_START}assistant\n<tool_call>\n{call}\n</tool_call>{IM_END}")
        lines.append(f"{IM_START}user\n<tool_response>\n{json.dumps(args)}\n</tool_response>{IM_END}")
        spec = {"type": "function", "function": {"name": name, "description": " ".join(rng.sample(words, 5)),
                "parameters": {"type": "object", "properties": {k: {"type": "string"} for k in args}}}}
        lines.append(json.dumps(spec))
    for _ in range(200):
        lines.append(f"{IM_START}user\n{rng.choice(words).capitalize()} {rng.choice(words)}?{IM_END}\n"
                     f"{IM_START}assistant\n{' '.join(rng.sample(words, 6))}.{IM_END}\n{ENDOFTEXT}")
    rng.shuffle(lines)
    return lines


def build_tiny_tokenizer(*, seed: int = 0, vocab_size: int = 1024) -> "PreTrainedTokenizerBase":
    """A byte-level BPE tokenizer trained offline on `_corpus(seed)`, with the ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [ENDOFTEXT, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    # Qwen2's pipeline (NFC, its split regex with single digits, byte level): AutoTokenizer loads
    # a `qwen2` model directory as Qwen2Tokenizer, which rebuilds exactly this pipeline.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.add_tokens(list(MARKUP_TOKENS))
    return fast


def build_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny random Qwen2 model + tokenizer to `out_dir`; return the path.

    Loads back with `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`. Same seed, same files."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(seed=seed)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
