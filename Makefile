# glucoagent: `make demo` and `make test` set themselves up from a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mosquitto: the real broker; qemu-user-static + archive keyring: the emulated MIPS device;
# faketime: a box whose clock is wrong, for real. cmake … zlib1g-dev: build OpenWrt's own uci, opkg, apk
# and jshn from ../shared/openwrt-tools; busybox: the ash that runs the init script through rc.common;
# fakeroot: `make apk` as a non-root user still gives root-owned files; openssl: the signed-feed test's key.
# mosquitto-dev libmosquitto-dev gcc libc6-dev: the broker's client-id binding plugin
# (backend/mosquitto/glucoagent_auth.c), built by `make setup`.
# tinyproxy: the real HTTP CONNECT proxy of tests/system/test_field_links.py (testbed/httpproxy.py).
DEBS := mosquitto mosquitto-clients qemu-user-static debian-archive-keyring faketime cmake build-essential pkg-config libjson-c-dev libssl-dev libcurl4-openssl-dev meson ninja-build libzstd-dev zlib1g-dev busybox fakeroot openssl mosquitto-dev libmosquitto-dev gcc libc6-dev tinyproxy
VECTORS ?= ../shared/vectors
OPENWRT_TOOLS ?= ../shared/openwrt-tools
# mosquitto loads this plugin (backend/broker.py): it binds each client id to its certificate's CN.
AUTH_PLUGIN := build/glucoagent_auth.so
# Test worker processes (pytest-xdist; each test module stays in one worker): the tests mostly wait on
# brokers, ptys and kills, so 3 workers on 2 cores halve the wall time. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 3

.PHONY: setup debs demo demo-update test lint bench soak ipk apk sbom openwrt-tools clean

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
	$(BIN)/python -m testbed.demo

# One signed update end to end, then a broken one rolled back by the watchdog, readings throughout (docs/updates.md).
demo-update: setup
	$(BIN)/python -m testbed.demo_update --tools-src $(OPENWRT_TOOLS)

test: setup lint
	@if [ -d "$(VECTORS)" ]; then export GLUCOAGENT_VECTORS="$$(cd $(VECTORS) && pwd)"; \
	  else echo "conformance suite did not run: $(VECTORS) is absent"; fi; \
	  if [ -d "$(OPENWRT_TOOLS)" ]; then GLUCOAGENT_OPENWRT_TOOLS="$$($(BIN)/python -m openwrt.hosttools --src $(OPENWRT_TOOLS))" || exit 1; \
	    export GLUCOAGENT_OPENWRT_TOOLS; \
	  else echo "OpenWrt tools suite did not run: $(OPENWRT_TOOLS) is absent"; fi; \
	  $(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

lint: setup
	$(BIN)/ruff check agent drivers backend bench openwrt testbed tests
	$(BIN)/mypy --strict agent drivers backend bench openwrt testbed
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/python -m bench.run

# The soak: the full system under a fault schedule, then the SIGKILL crash loop of `make test`
# with thousands of kills (100 per soak minute unless SOAK_KILLS says otherwise).
SOAK_MINUTES ?= 30
SOAK_KILLS ?= $(shell echo $$(( $(SOAK_MINUTES) * 100 )))
soak: setup
	$(BIN)/python -m testbed.soak --minutes $(SOAK_MINUTES)
	GLUCOAGENT_CRASH_KILLS=$(SOAK_KILLS) $(BIN)/pytest -q -p no:cacheprovider tests/system/test_crash.py

# OpenWrt's own uci, opkg, apk, jshn, built once into ~/.cache/glucoagent (GLUCOAGENT_TOOLS_CACHE).
openwrt-tools: setup
	$(BIN)/python -m openwrt.hosttools --src $(OPENWRT_TOOLS)

ipk: setup
	$(BIN)/python -m openwrt.build_ipk --out dist
	$(BIN)/python -m openwrt.build_ipk --out dist --ble

# The apk-tools v3 package for OpenWrt 25.12+, from the same description, by the real `apk mkpkg`
# (built from $(OPENWRT_TOOLS), or APK=/path/to/an/apk3 such as an SDK's staging_dir/host/bin/apk).
apk: setup
	$(BIN)/python -m openwrt.build_apk --out dist $(if $(APK),--apk $(APK),--tools-src $(OPENWRT_TOOLS))
	$(BIN)/python -m openwrt.build_apk --out dist --ble $(if $(APK),--apk $(APK),--tools-src $(OPENWRT_TOOLS))

# One SBOM per artefact, each read from the built package (the .apk through the real apk).
sbom: ipk apk
	@v=$$($(BIN)/python -c 'from openwrt.package import package_version as v; print(v())'); \
	  $(BIN)/python -m openwrt.sbom --ipk dist/glucoagent_$${v}_all.ipk --out dist/glucoagent.cdx.json && \
	  $(BIN)/python -m openwrt.sbom --apk dist/glucoagent-$${v%-*}-r$${v##*-}.apk \
	    $(if $(APK),--apk-tool $(APK),--tools-src $(OPENWRT_TOOLS)) --out dist/glucoagent.apk.cdx.json

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis .ruff_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
