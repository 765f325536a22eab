"""`openrft serve --model DIR [--adapter RUN_DIR/adapter]`: an OpenAI-compatible endpoint
(`POST /v1/chat/completions` with tools, `GET /v1/models`, `GET /health`) for a local model
with a trained LoRA adapter applied.

It is the gateway's completion path without the rollouts: the same chat rendering, the same
batched TransformersBackend, the same tool-call parsing, so the served policy sees prompts
exactly as it did in training. The adapter (a standard PEFT directory) is loaded with
`PeftModel.from_pretrained` and merged into the base weights for faster inference.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from trainer.backend import GenerationBackend
from trainer.completions import APIError, ChatCompleter, completion_response, install_error_handlers, read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def create_app(
    backend: GenerationBackend,
    tokenizer: Any,
    *,
    model_name: str = "policy",
    default_max_tokens: int = 512,
    tool_parser: str = "hermes",
    api_key: str | None = None,
) -> FastAPI:
    """The HTTP app around a backend. With `api_key`, requests need `Authorization: Bearer <api_key>`."""
    completer = ChatCompleter(backend, tokenizer, model_name=model_name, default_max_tokens=default_max_tokens, tool_parser=tool_parser)
    app = FastAPI(title="openrft serve")
    install_error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), api_key):
            raise APIError(401, "invalid or missing API key", type_="authentication_error", code="invalid_api_key")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        completion = await completer.complete(await read_json(request))
        return completion_response(completion)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return completer.models_response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def load_policy(
    model_dir: str | Path, adapter_dir: str | Path | None = None, *, device: str = "cpu"
) -> "tuple[PreTrainedModel, PreTrainedTokenizerBase]":
    """The base model with the adapter (if any) applied and merged, and its tokenizer."""
    from trainer.models import load_model

    model, tokenizer = load_model(model_dir, device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter = Path(adapter_dir)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    return model, tokenizer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openrft serve", description="serve a model (+ LoRA adapter) behind an OpenAI-compatible API")
    parser.add_argument("--model", required=True, type=Path, help="base model directory (transformers format)")
    parser.add_argument("--adapter", type=Path, default=None, help="PEFT adapter directory, e.g. RUN_DIR/adapter")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model id reported (default: the adapter's run dir, else the model dir name)")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of a request")
    parser.add_argument("--tool-parser", default="hermes")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    import uvicorn

    from trainer.backend import TransformersBackend

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model, tokenizer = load_policy(args.model, args.adapter, device=device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"openrft serve: {exc}", file=sys.stderr)
        return 2
    name = args.served_model_name or (args.adapter.resolve().parent.name if args.adapter else args.model.resolve().name)
    backend = TransformersBackend(model, tokenizer, max_batch_size=args.max_batch_size)
    app = create_app(backend, tokenizer, model_name=name, default_max_tokens=args.max_tokens, tool_parser=args.tool_parser, api_key=args.api_key)
    print(f"openrft serve: {name} on {device} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    backend.close()
    return 0
