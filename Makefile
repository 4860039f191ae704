# The two commands a newcomer needs: `make demo` and `make test`.
# Both install everything first (Debian packages + a virtualenv), idempotently.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := nftables iptables iperf3 curl iproute2 procps mptcpize
STAMP_SYS := $(VENV)/.system-packages
STAMP_PY  := $(VENV)/.python-packages
STAMP_FUZZ := $(VENV)/.fuzz-packages
# `make fuzz FUZZ_SECONDS=600 FUZZ_TARGETS="dns socks5"`: budget per target, subset.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=

.PHONY: setup demo test test-unit test-integration bench fuzz clean lab-clean

setup: $(STAMP_SYS) $(STAMP_PY)

$(STAMP_SYS):
	@mkdir -p $(VENV)
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMP_PY): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

demo: setup
	$(BIN)/mptcp-proxy demo

test: setup
	$(BIN)/python -m pytest -q tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q -m integration tests

# Coverage-guided fuzzing of every codec and handshake (fuzz/run.py, atheris).
# Crash inputs land in fuzz/crashes/<target>/: turn each into a test in
# tests/unit/test_fuzz_regressions.py. Exit status 1 when anything crashed.
$(STAMP_FUZZ): $(STAMP_PY)
	@$(BIN)/python -m pip install -q -e '.[test,fuzz]'
	@touch $@

fuzz: setup $(STAMP_FUZZ)
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

bench: setup
	$(BIN)/python benchmarks/relay.py

lab-clean: setup
	$(BIN)/mptcp-proxy lab down --all

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
