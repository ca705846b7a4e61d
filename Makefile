# Every target creates .venv and installs lmforge into it when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is installed on its own first so that nothing else picks the build. On Linux, PyPI's
# torch is the CUDA build; for the small CPU-only wheel elsewhere add
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lmforge demo

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "not gpu" -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/lmforge bench tokenizer --json runs/bench/tokenizer.json

clean:
	rm -rf runs .pytest_cache
