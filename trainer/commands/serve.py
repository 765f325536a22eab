"""`openrft serve --model DIR [--adapter RUN_DIR/adapter]`: an OpenAI-compatible endpoint
(`POST /v1/chat/completions` with tools, `GET /v1/models`, `GET /health`) for a local model
with a trained LoRA adapter applied.

It is the gateway's completion path without the rollouts: the same chat rendering, the same
batched TransformersBackend, the same tool-call parsing, so the served policy sees prompts
exactly as it did in training. The adapter (a standard PEFT directory) is merged into the base
weights for faster inference (`trainer.models.load_policy`). With `stream: true` each token's text
is sent as it is sampled. It also serves eval-protocol's tracing-gateway contract
(`add_rollout_routes`), so that their RemoteRolloutProcessor can run rows against an env server
with this model (SPEC §9).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from trainer.types import GenerationBackend
from trainer.gateway.completions import ChatCompleter
from trainer.gateway.http import APIError, install_error_handlers, read_json
from trainer.gateway.streaming import completion_response
from trainer.gateway import ROLLOUT_IDS, ROLLOUT_PATH
from trainer.gateway.tracing import Authorize, TraceStore, add_tracing_routes, read_log_record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def create_app(
    backend: GenerationBackend,
    tokenizer: PreTrainedTokenizerBase,
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
        return await completer.respond(await read_json(request))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return completer.models_response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    add_rollout_routes(app, completer, authorize)
    return app


def add_rollout_routes(app: FastAPI, completer: ChatCompleter, authorize: Authorize) -> None:
    """eval-protocol's tracing-gateway contract (see trainer/gateway/tracing.py), so that its
    RemoteRolloutProcessor can run rows against an env server with this model: chat completions
    under the per-rollout path it builds (`{model_base_url}/rollout_id/<id>/.../row_id/<id>`, with or
    without `/v1` before it), the env servers' status pushes (`POST /logs`), and the read-out."""
    store = TraceStore()

    async def rollout_chat(request: Request) -> Response:
        authorize(request)
        completion = await completer.complete(await read_json(request))
        ids = {name: request.path_params[name] for name in ROLLOUT_IDS}
        for choice in completion.choices:
            store.add_trace(ids, completion.messages, completion.tools, choice.message)
        return completion_response(completion)

    for prefix in ("", "/v1"):
        app.post(prefix + ROLLOUT_PATH.removeprefix("/v1") + "/chat/completions")(rollout_chat)

    @app.post("/logs")
    @app.post("/v1/logs")
    async def push_log(request: Request) -> dict[str, Any]:
        """A status log record from an env server (eval-protocol's FireworksTracingHttpHandler shape)."""
        authorize(request)
        record = await read_log_record(request)
        store.add_log(record)
        return {"status": "ok", "rollouts": record.rollout_ids()}

    add_tracing_routes(app, store, authorize)


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

    from trainer.config import GenerationConfig, VLLMConfig
    from trainer.generation import create_backend
    from trainer.models import load_policy

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model, tokenizer = load_policy(args.model, args.adapter, device=device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"openrft serve: {exc}", file=sys.stderr)
        return 2
    name = args.served_model_name or (args.adapter.resolve().parent.name if args.adapter else args.model.resolve().name)
    backend = create_backend("transformers", args.model, model, tokenizer,
                           generation=GenerationConfig(max_batch_size=args.max_batch_size), vllm=VLLMConfig(),
                           lora_rank=0, dtype=str(model.dtype).removeprefix("torch."), seed=0, log_dir=Path("."))
    app = create_app(backend, tokenizer, model_name=name, default_max_tokens=args.max_tokens, tool_parser=args.tool_parser, api_key=args.api_key)
    print(f"openrft serve: {name} on {device} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    backend.close()
    return 0
