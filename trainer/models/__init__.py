"""Models: building local model directories (a tiny one for tests, SmolLM2 from a GGUF), loading
them with or without an adapter, the chat format they speak, and exporting adapters."""

from trainer.models.loading import load_model, load_policy, load_tokenizer
from trainer.models.templates import CHAT_TEMPLATE, IM_END, IM_START
from trainer.models.tiny import build_tiny_model, build_tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "IM_END", "IM_START", "build_tiny_model", "build_tiny_tokenizer", "load_model",
           "load_policy",
           "load_tokenizer"]
