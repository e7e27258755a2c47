# loraserve: the two commands are `make serve` and `make test`; everything else is a step of them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install. The default takes the CPU wheel on machines without CUDA; on a GPU
# machine pass a CUDA build, e.g. `make install TORCH='torch==2.13.0' PIP_TORCH_ARGS='--index-url <your CUDA wheel index>'`.
TORCH ?= torch==2.13.0
PIP_TORCH_ARGS ?=

# `make serve` serves the embedded demo from a writable copy of its adapters, so a freshly
# trained adapter can be dropped next to them.
ADAPTERS_DIR ?= run/adapters
SERVE_ARGS ?=

.PHONY: install test lint proto serve bench bench-quick demo-assets clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) '$(TORCH)'
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

# Regenerate the committed gRPC stubs (a test fails when they are stale).
proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/loraserve/v1/inference.proto

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

serve: install
	@mkdir -p $(ADAPTERS_DIR)
	@for f in adapters/demo/adapters/*.safetensors; do \
		[ -e "$(ADAPTERS_DIR)/$$(basename $$f)" ] || cp "$$f" "$(ADAPTERS_DIR)/"; done
	$(VENV)/bin/loraserve-server --model demo --adapters $(ADAPTERS_DIR) $(SERVE_ARGS)

# Rebuild the embedded demo (base model, tokenizer, data, 4 adapters) from scratch,
# deterministically for a given machine and torch version; ~6-7 minutes on 2 CPU cores.
demo-assets: install
	$(PY) -m adapters.demo_recipe

# Benchmarks (bench/README.md): the full CPU suite ~15 min, the quick one ~2 min on 2 cores.
bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check adapters server client tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
