# The two commands a newcomer needs:  `make run` (the example job end to end) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# prometheus: promtool checks deploy/prometheus/alerts.yml in the tests (about 96 MB, 7 s to install)
APT_PACKAGES := redis-server bubblewrap libseccomp2 util-linux e2fsprogs curl git python3 python3-requests iproute2 prometheus
STAMP := $(VENV)/.installed

.PHONY: deps system-deps node-deps run up test test-fast bench dashboard clean

deps: system-deps $(STAMP) node-deps

# Debian packages the stack needs; installed only when missing (needs root, as CI is).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root (or install:$$missing)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

node-deps:
	@command -v npm >/dev/null || { echo "npm (Node.js 20) is needed for clients/node and its tests"; exit 1; }
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	cd tests/faults/node && npm ci --no-audit --no-fund --loglevel=error  # celery-node, a stock producer

# Bring up Redis, SeaweedFS, a worker, beat and Flower; submit examples/hello.json; show its
# logs and final record; stop everything.
run: deps
	$(BIN)/python -m devstack run examples/hello.json

# The same stack in the foreground until Ctrl-C.
up: deps
	$(BIN)/python -m devstack up

# The whole suite; every service it needs is started (and stopped) by the test fixtures.
test: deps
	$(BIN)/python -m pytest

test-fast: deps
	$(BIN)/python -m pytest tests/unit

bench: deps
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/capacity.py
	$(BIN)/python bench/sandbox_start.py 50
	$(BIN)/python bench/storage_memory.py
	$(BIN)/python bench/egress.py 300

# A real run scraped by a real Prometheus, drawn as deploy/grafana/sandbox.json's panels, and
# screenshots of it and of Flower's task list (docs/img/). Chromium only for this target (~270 MB).
DASHBOARD_PACKAGES := chromium fonts-dejavu-core
dashboard: deps
	@missing=""; for p in $(DASHBOARD_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(BIN)/python -m devstack.dashboard

clean:
	# the worker's run dir (SANDBOX_RUN_DIR) is a tmpfs under var/work: unmount before deleting
	awk '$$5 ~ "^$(CURDIR)/var/" {print $$5}' /proc/self/mountinfo | sort -r | xargs -r umount -l
	rm -rf var .pytest_cache
