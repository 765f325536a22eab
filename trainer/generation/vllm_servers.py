"""vLLM servers started by openrft: from vLLM's own virtual environment (`scripts/vllm_venv.sh`
builds `.venv-vllm`), each on a free port, with runtime LoRA loading on, killed with the trainer,
and waited for until healthy. `VLLMBackend.launch` (vllm_backend.py) uses them."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger("trainer.vllm")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
# vLLM accepts only these LoRA ranks for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_KV_CACHE_GIB = 4  # KV cache of servers started on CPU, unless $VLLM_CPU_KVCACHE_SPACE says otherwise


class VLLMError(RuntimeError):
    """A vLLM server could not be started, reached, or brought to the current weights."""


def vllm_python(python: str | Path | None = None) -> Path:
    """The interpreter of the vLLM venv: `python`, else $OPENRFT_VLLM_PYTHON, else .venv-vllm."""
    path = Path(python or os.environ.get("OPENRFT_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON)
    if not path.is_file():
        raise VLLMError(
            f"no vLLM interpreter at {path}: build the vLLM venv with `bash scripts/vllm_venv.sh` "
            "or set vllm.python to a python that has vllm installed"
        )
    return path


def server_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise VLLMError(f"lora.rank {rank} exceeds the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]})")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server when the process that started it dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class VLLMServer:
    """A vLLM API server process started by openrft (its own process group: engine + workers)."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        """Kill the server and its engine/worker children at once (tests: a server dying mid-step)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group (vLLM shuts its engine down), SIGKILL what is left after timeout_s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # children that outlived the API server
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_servers(
    model_dir: str | Path,
    *,
    num_servers: int = 1,
    python: str | Path | None = None,
    max_lora_rank: int = 16,
    max_model_len: int | None = None,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
    log_dir: str | Path,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 600.0,
) -> list[VLLMServer]:
    """Start `num_servers` vLLM API servers on free ports (in parallel) and wait until each answers
    /health. Raises VLLMError with the end of the server's log if one exits or is not up in time;
    the others are stopped then."""
    interpreter = vllm_python(python)
    model = Path(model_dir).resolve()
    if not (model / "config.json").is_file():
        raise VLLMError(f"vllm: {model} is not a model directory (no config.json)")
    logs = Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    # vLLM on CPU otherwise reserves 90% of the machine's memory (--gpu-memory-utilization); ignored on GPU
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    servers: list[VLLMServer] = []
    try:
        for index in range(num_servers):
            port = _free_port(host)
            cmd = [
                str(interpreter), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model), "--host", host, "--port", str(port),
                "--enable-lora", "--max-lora-rank", str(server_lora_rank(max_lora_rank)),
                "--max-loras", "1", "--logprobs-mode", "raw_logprobs", "--dtype", dtype,
                "--disable-uvicorn-access-log",
            ]
            if max_model_len is not None:
                cmd += ["--max-model-len", str(max_model_len)]
            cmd += list(extra_args)
            log_path = logs / f"server_{index}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            servers.append(VLLMServer(f"http://{host}:{port}", process, log_path))
            logger.info("vllm: starting %s (log %s)", servers[-1].url, log_path)
        _wait_healthy(servers, startup_timeout_s)
    except BaseException:
        for server in servers:
            server.stop(timeout_s=5)
        raise
    return servers


def _wait_healthy(servers: list[VLLMServer], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for server in list(pending):
                code = server.process.poll()
                if code is not None:
                    raise VLLMError(
                        f"vllm server {server.url} exited with code {code} while starting; "
                        f"end of {server.log_path}:\n{server.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{server.url}/health").status_code == 200:
                        pending.remove(server)
            if pending and time.monotonic() > deadline:
                server = pending[0]
                raise VLLMError(
                    f"vllm server {server.url} was not up after {timeout_s:.0f} s (vllm.startup_timeout_s); "
                    f"end of {server.log_path}:\n{server.log_tail()}"
                )
            if pending:
                time.sleep(0.5)
