# glucoagent: `make demo` and `make test` set themselves up from a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mosquitto: the real broker; qemu-user-static + archive keyring: the emulated MIPS device;
# faketime: a box whose clock is wrong, for real. mosquitto-dev libmosquitto-dev libssl-dev gcc libc6-dev:
# the broker's client-id binding plugin (backend/mosquitto/glucoagent_auth.c), built by `make setup`.
DEBS := mosquitto mosquitto-clients qemu-user-static debian-archive-keyring faketime mosquitto-dev libmosquitto-dev libssl-dev gcc libc6-dev
VECTORS ?= ../shared/vectors
# mosquitto loads this plugin (backend/broker.py): it binds each client id to its certificate's CN.
AUTH_PLUGIN := build/glucoagent_auth.so

.PHONY: setup debs demo test lint bench soak ipk sbom clean

setup: debs $(STAMP) $(AUTH_PLUGIN)

$(AUTH_PLUGIN): backend/mosquitto/glucoagent_auth.c | debs
	@mkdir -p build
	@command -v cc >/dev/null || { echo "setup: no C compiler (cc) to build $@: apt-get install gcc" >&2; exit 1; }
	cc -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -lcrypto

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
	$(BIN)/ruff check agent drivers backend bench openwrt tests
	$(BIN)/mypy --strict agent drivers backend bench openwrt

bench: setup
	$(BIN)/python -m bench.run

# The soak: the full system under a fault schedule, then the SIGKILL crash loop of `make test`
# with thousands of kills (100 per soak minute unless SOAK_KILLS says otherwise).
SOAK_MINUTES ?= 30
SOAK_KILLS ?= $(shell echo $$(( $(SOAK_MINUTES) * 100 )))
soak: setup
	$(BIN)/python -m backend.soak --minutes $(SOAK_MINUTES)
	GLUCOAGENT_CRASH_KILLS=$(SOAK_KILLS) $(BIN)/pytest -q -p no:cacheprovider tests/test_crash.py

ipk: setup
	$(BIN)/python -m openwrt.build_ipk --out dist

sbom: ipk
	$(BIN)/python -m openwrt.sbom --ipk dist/glucoagent_$$($(BIN)/python -c 'from openwrt.build_ipk import package_version as v; print(v())')_all.ipk --out dist/glucoagent.cdx.json

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis .ruff_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
