# filterhost: development and CI entry points. `make test` is what CI runs (.ci/run).
#   make venv       .venv with filterhost[test] (+ every examples/*/ with a pyproject.toml)
#   make run        serve with conf.d/
#   make demo       the five-minute tour: DNS, clamd, two recipient servers and filterhost in a
#                   private network namespace, five messages, what became of each (demo/run.sh)
#   make testdeps   apt packages of the test components (no-op when present)
#   make lint       ruff + mypy
#   make test       lint, then pytest inside a private network namespace
#                   (extra pytest arguments: make test PYTEST_ARGS='-k sink -x')
#   make bench      filterhost vs a private Postfix vs the ceiling, as root, in a private
#                   network namespace -> bench/RESULTS.md (knobs: see bench/run.sh; a quick
#                   run: RUNS=1 N_5K=500 N_5K_1S=200 N_1M=20 make bench)
#   make bench-profile  one bench load with filterhost under py-spy -> bench/profiles/
#   make clean

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp-install
EXAMPLE_PROJECTS := $(wildcard examples/*/pyproject.toml)
EXAMPLES := $(patsubst %/pyproject.toml,%,$(EXAMPLE_PROJECTS))
PYTEST_ARGS ?=

.PHONY: venv run demo testdeps lint test clean bench-deps bench bench-profile

venv: $(STAMP)

# The stamp is newer than every pyproject.toml once pip has run, so a second
# `make test` does not touch pip.
$(STAMP): pyproject.toml $(EXAMPLE_PROJECTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check \
	    -e '.[test]' $(addprefix -e ./,$(EXAMPLES))
	touch $@

run: venv
	exec $(VENV)/bin/filterhost -c conf.d

# demo/run.sh enters a private network namespace itself (only loopback), and stops by PID
# everything it started.
demo: venv testdeps
	bash demo/run.sh

testdeps:
	bash scripts/install-test-deps.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# pytest exits 5 when it collected nothing: that fails too, the suite must run tests.
# The relay's tests run a second time through the delivery agent ([relay] delivery_process),
# so that the opt-in path is proven against the same TLS, AUTH, DSN and crash cases.
AGENT_TESTS = tests/test_relay_e2e.py tests/test_outbound_tls.py tests/test_bounces.py \
	tests/test_crash_recovery.py tests/test_queue_cli.py tests/test_routing_plugin.py

test: venv testdeps lint
	rc=0; scripts/netns-run $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	if [ "$$rc" -eq 0 ] && [ -z "$(PYTEST_ARGS)" ]; then \
	  FILTERHOST_TEST_DELIVERY_PROCESS=1 scripts/netns-run $(VENV)/bin/python -m pytest -q \
	    $(AGENT_TESTS) || rc=$$?; \
	fi; \
	exit "$$rc"

# smtp-source, smtp-sink and postfix come from the postfix package, clamd from clamav-daemon:
# install-test-deps.sh installs them with service starts forbidden (the system MTA never runs).
bench-deps: testdeps

bench: venv bench-deps
	bench/run.sh

bench-profile: venv bench-deps
	test -x $(VENV)/bin/py-spy || $(VENV)/bin/python -m pip install --disable-pip-version-check py-spy
	bench/profile.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
