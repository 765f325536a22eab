"""Generation: the backends the gateway samples with (the contract is `trainer.types.GenerationBackend`).

transformers_backend.py: batched sampling from the live model object (decoder.py: the decode loop);
vllm_backend.py: vLLM servers over HTTP with hot-loaded adapters; scripted.py: a scripted test double;
factory.py: the one place backends are built (train, eval, serve); timed.py: generation time and tokens.
"""

from trainer.generation.factory import create_backend, sync_weights
from trainer.generation.scripted import ScriptedBackend
from trainer.generation.transformers_backend import TransformersBackend

__all__ = ["ScriptedBackend", "TransformersBackend", "create_backend", "sync_weights"]
