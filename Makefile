# One entry point for people and CI. Every target sets itself up on a fresh
# Debian machine with Python 3.11: Debian packages, the venv, the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The source tree seen at the path ansible and Python import it from.
COLLECTIONS := $(CURDIR)/collections
export PYTHONPATH := $(COLLECTIONS)$(if $(PYTHONPATH),:$(PYTHONPATH))
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)

.PHONY: all deps venv link test lint demo bench clean

all: test

# Debian packages the project needs at run time (FUSE 3 for `enclave sync`).
deps:
	@if ! dpkg -s fuse3 libfuse3-3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-3 >/dev/null; \
	  else echo "warning: install fuse3 and libfuse3-3 (sudo apt-get install fuse3 libfuse3-3)" >&2; fi; \
	fi

$(BIN)/enclave: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '.[test,examples]'
	@touch $@

venv: deps $(BIN)/enclave link

link:
	@mkdir -p $(COLLECTIONS)/ansible_collections/confidential_ml
	@ln -sfn $(CURDIR) $(COLLECTIONS)/ansible_collections/confidential_ml/nitro

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(COLLECTIONS) .pytest_cache .ruff_cache
