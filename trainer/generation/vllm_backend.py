"""Generation with vLLM servers over HTTP, and LoRA weight sync after every optimizer step.

`VLLMBackend` implements `GenerationBackend` against one or more vLLM OpenAI-compatible servers,
either given as URLs or started here (`VLLMBackend.launch`) from vLLM's own virtual environment
(`scripts/vllm_venv.sh` builds `.venv-vllm`; vLLM pins versions the trainer's venv cannot share).

Generation: `POST /v1/completions` with `prompt` = the exact prompt token ids the gateway built,
`return_token_ids` (the completion's token ids come back as ids, never re-tokenized text) and
`logprobs: 0` (the logprob of each sampled token only). Requests go to the server with the fewest
requests in flight.

Logprobs: servers started here run with `--logprobs-mode raw_logprobs` (also vLLM's default):
log_softmax of the model's raw logits, before temperature, top-p or penalties, i.e. the
temperature-1 logprob the learner computes. `dtype` defaults to the learner's, so on CPU both sides
run float32 (vLLM would otherwise downcast to bfloat16). The remaining sampling-vs-training
difference is kernel numerics; the trainer records it per step as `logprob_abs_diff`
(docs/vllm.md).

Weight sync: `weights_updated(adapter_dir)` loads the new adapter into every server under a fresh
name (`POST /v1/load_lora_adapter`, needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` on the server),
switches generation to that name only once every server has it, then unloads the previous name.
Loads run under a timeout; a failed or slow load raises `VLLMError` and leaves the backend refusing
to generate, so a run can never go on sampling from stale weights. Until the first sync the servers'
base model is used: the learner's LoRA starts at zero (B = 0), so base and policy are the same model.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trainer.generation.vllm_servers import VLLMError, VLLMServer, start_servers
from trainer.types import Generation, SamplingParams

logger = logging.getLogger("trainer.vllm")

_TOKEN_ID = re.compile(r"token_id:(\d+)")


@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0


class VLLMBackend:
    """GenerationBackend over vLLM servers (see the module docstring)."""

    #: the training loop saves the adapter after every optimizer step and passes its directory
    #: to `weights_updated` (the servers cannot see the learner's live model object).
    needs_adapter_dir = True
    lock = None  # the servers hold their own weights: the learner needs no lock against them
    stats = None

    def __init__(
        self,
        urls: Sequence[str],
        *,
        servers: Sequence[VLLMServer] = (),
        api_key: str | None = None,
        request_timeout_s: float = 600.0,
        load_timeout_s: float = 120.0,
        max_connections: int = 256,
    ) -> None:
        if not urls:
            raise VLLMError("vllm: no server URLs (set vllm.urls, or leave it empty to start servers)")
        self.endpoints = [_Endpoint(url.rstrip("/").removesuffix("/v1")) for url in urls]
        self.servers = list(servers)  # the ones this backend started and stops on close()
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self.load_timeout_s = load_timeout_s
        self.max_connections = max_connections
        self.adapter_name: str | None = None  # None: the base model (before the first sync)
        self._prefix = f"openrft-{uuid.uuid4().hex[:8]}"
        self._version = itertools.count(1)
        self._base_name: str | None = None
        self._max_model_len: int | None = None
        self._broken: str | None = None  # why generation is refused (a failed weight sync)
        self._in_use: dict[str | None, int] = {}
        self._rotate = itertools.count()
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._info_lock: asyncio.Lock | None = None
        if self.servers:
            atexit.register(self.close)

    @classmethod
    def launch(
        cls,
        model_dir: str | Path,
        *,
        num_servers: int = 1,
        python: str | Path | None = None,
        max_lora_rank: int = 16,
        max_model_len: int | None = None,
        dtype: str = "auto",
        extra_args: Sequence[str] = (),
        log_dir: str | Path,
        startup_timeout_s: float = 600.0,
        **kwargs: Any,
    ) -> VLLMBackend:
        """Start servers for `model_dir` (see `start_servers`) and a backend that owns them."""
        servers = start_servers(
            model_dir, num_servers=num_servers, python=python, max_lora_rank=max_lora_rank,
            max_model_len=max_model_len, dtype=dtype, extra_args=extra_args, log_dir=log_dir,
            startup_timeout_s=startup_timeout_s,
        )
        return cls([s.url for s in servers], servers=servers, **kwargs)

    # --- plumbing -------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
            self._client = httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(self.request_timeout_s, connect=10.0))
            self._client_loop = loop
            self._info_lock = asyncio.Lock()
        return self._client

    async def _server_info(self) -> tuple[str, int | None]:
        """(served base model name, max_model_len), read once from the first server's /v1/models."""
        if self._base_name is None:
            client = self._http()
            assert self._info_lock is not None
            async with self._info_lock:
                if self._base_name is None:
                    url = self.endpoints[0].url
                    data = await self._call(client.get(f"{url}/v1/models"), url, "GET /v1/models")
                    bases = [m for m in data.get("data", []) if not m.get("parent")]
                    if not bases:
                        raise VLLMError(f"vllm server {url}: /v1/models lists no base model: {data}")
                    self._max_model_len = bases[0].get("max_model_len")
                    self._base_name = str(bases[0]["id"])
        return self._base_name, self._max_model_len

    @staticmethod
    async def _call(request: Any, url: str, what: str) -> Any:
        """Await an httpx request; a clear VLLMError for transport errors and non-2xx answers."""
        try:
            response = await request
        except httpx.TimeoutException as exc:
            raise VLLMError(f"vllm server {url}: {what} timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise VLLMError(f"vllm server {url} is unreachable ({what}): {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise VLLMError(f"vllm server {url}: {what} answered {response.status_code}: {message}")
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def _pick(self) -> _Endpoint:
        """The server with the fewest requests in flight (ties rotate)."""
        start = next(self._rotate) % len(self.endpoints)
        order = self.endpoints[start:] + self.endpoints[:start]
        return min(order, key=lambda e: e.in_flight)

    # --- GenerationBackend ----------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self._broken:
            raise VLLMError(f"vllm backend refuses to generate: {self._broken}")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        base, max_len = await self._server_info()
        max_tokens = params.max_tokens
        if max_len is not None:
            if len(prompt_ids) >= max_len:
                raise ValueError(f"prompt is {len(prompt_ids)} tokens; the vLLM servers take at most {max_len - 1} (vllm.max_model_len)")
            max_tokens = min(max_tokens, max_len - len(prompt_ids))
        name = self.adapter_name
        body: dict[str, Any] = {
            "model": name or base,
            "prompt": list(prompt_ids),
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop_token_ids": list(params.stop_token_ids),
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        endpoint = self._pick()
        endpoint.in_flight += 1
        self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            data = await self._call(
                self._http().post(f"{endpoint.url}/v1/completions", json=body), endpoint.url, "POST /v1/completions"
            )
        finally:
            endpoint.in_flight -= 1
            self._in_use[name] -= 1
        return _parse_completion(data, endpoint.url)

    async def weights_updated(self, adapter_dir: Path | None) -> None:
        """Load `adapter_dir` into every server under a new name; generate with it from now on."""
        if adapter_dir is None:
            self._broken = "the weights changed but no adapter directory was given to load"
            raise VLLMError(
                "vllm backend: weights_updated(None) after an optimizer step; the vLLM backend needs the "
                "saved adapter directory of every step (the training loop saves one when "
                "backend.needs_adapter_dir is true)"
            )
        path = Path(adapter_dir).resolve()
        if not (path / "adapter_config.json").is_file():
            self._broken = f"the adapter {path} could not be loaded"
            raise VLLMError(f"vllm backend: {path} is not a PEFT adapter directory (no adapter_config.json)")
        name = f"{self._prefix}-{next(self._version)}"
        client = self._http()
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            await asyncio.wait_for(
                asyncio.gather(*(
                    self._call(client.post(f"{e.url}/v1/load_lora_adapter", json=body, timeout=self.load_timeout_s),
                               e.url, f"loading adapter {path}")
                    for e in self.endpoints
                )),
                timeout=self.load_timeout_s,
            )
        except asyncio.TimeoutError:
            self._broken = f"loading adapter {path} timed out"
            raise VLLMError(
                f"vllm backend: loading adapter {path} into {len(self.endpoints)} server(s) took longer than "
                f"{self.load_timeout_s:g} s (vllm.load_timeout_s); generation stopped rather than sample old weights"
            ) from None
        except VLLMError as exc:
            self._broken = f"loading adapter {path} failed"
            raise VLLMError(f"vllm backend: weight sync failed, generation stopped rather than sample old weights: {exc}") from exc
        old = self.adapter_name
        self.adapter_name, self._broken = name, None
        if old is not None:
            await self._unload(old)

    async def _unload(self, name: str) -> None:
        """Unload `name` once no request uses it (best effort: generation has already moved on)."""
        deadline = time.monotonic() + self.load_timeout_s
        while self._in_use.get(name, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        client = self._http()
        results = await asyncio.gather(
            *(self._call(client.post(f"{e.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=self.load_timeout_s),
                         e.url, f"unloading adapter {name}") for e in self.endpoints),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("%s", result)
        self._in_use.pop(name, None)

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the servers this backend started (URLs given from outside are left running)."""
        servers, self.servers = self.servers, []
        for server in servers:
            server.stop()
        if servers:
            atexit.unregister(self.close)
        self._client = None  # its pooled connections close with it


def _parse_completion(data: Any, url: str) -> Generation:
    """The first choice of a /v1/completions answer as a Generation; VLLMError if it lacks the ids
    or logprobs asked for (e.g. a server that is not vLLM, or a vLLM too old for return_token_ids)."""
    try:
        choice = data["choices"][0]
        token_ids = [int(t) for t in choice["token_ids"]]
        logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        tokens = choice["logprobs"]["tokens"]
        finish = choice["finish_reason"]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise VLLMError(
            f"vllm server {url}: a /v1/completions answer without token_ids/logprobs ({exc!r}); "
            "it must be vLLM >= 0.10 serving return_token_ids"
        ) from None
    ids_from_tokens = [int(m.group(1)) if (m := _TOKEN_ID.fullmatch(str(t))) else None for t in tokens]
    if len(logprobs) != len(token_ids) or ids_from_tokens != token_ids:
        raise VLLMError(f"vllm server {url}: token_ids {token_ids[:8]} and logprobs tokens {tokens[:8]} disagree")
    if finish not in ("stop", "length"):
        raise VLLMError(f"vllm server {url}: generation ended with finish_reason={finish!r}")
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)

