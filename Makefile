# glucoagent: `make demo` and `make test` set themselves up from a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBS := mosquitto mosquitto-clients
VECTORS ?= ../shared/vectors

.PHONY: setup debs demo test lint bench clean

setup: debs $(STAMP)

# Debian packages the tests and the demo run for real (broker, clients).
debs:
	@missing=""; for p in $(DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "setup: need Debian packages:$$missing (run as root on Debian, or install them yourself)" >&2; exit 1; fi; \
	  echo "setup: installing$$missing with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	    || { echo "setup: apt-get could not install$$missing" >&2; exit 1; }; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip >/dev/null
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/glucoagent-backend demo

test: setup lint
	@if [ -d "$(VECTORS)" ]; then export GLUCOAGENT_VECTORS="$$(cd $(VECTORS) && pwd)"; \
	  else echo "conformance suite did not run: $(VECTORS) is absent"; fi; \
	  $(BIN)/pytest -q -p no:cacheprovider tests

lint: setup
	$(BIN)/ruff check agent drivers backend tests

bench: setup
	$(BIN)/python -m backend.bench

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis .ruff_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
