# Perito: `make demo` runs the main job, `make test` runs every check. Both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-deps proto sdk docs demo demo-rollout test unit integration scenarios lint format bench bench-trust bench-shadow bench-scale faults train-fashion-mnist clean deploy-secrets compose-up

install: system-deps $(STAMP)

# Exact versions of everything (torch 2.14.1 / torchvision 0.29.1 among them): constraints.txt.
$(STAMP): pyproject.toml constraints.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python scripts/gen_protos.py
	touch $@

# redis-server backs the job store and the Celery broker; Fashion-MNIST is the bulk-job test set;
# chromium runs the web page's browser test; curl uploads to the JSON API in its test; `ip`
# (iproute2) makes the network namespaces of the fault suite's cut-off-host; promtool
# (Debian's prometheus package, without its recommends) checks deploy/prometheus's alerts and
# the dashboard's queries: only the tool is wanted, so the package's daemon is stopped and disabled.
# redis-sentinel runs the Sentinel groups of the fault suite's sentinel-failover and of
# tests/integration/test_redis_sentinel.py, which start their own: the package's daemon (port
# 26379) is stopped and disabled too.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi; \
	if ! command -v promtool >/dev/null; then \
		echo "installing: prometheus (for promtool)"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		{ $$SUDO systemctl disable --now prometheus || $$SUDO service prometheus stop; } >/dev/null 2>&1 || true; \
	fi; \
	if ! command -v redis-sentinel >/dev/null; then \
		echo "installing: redis-sentinel"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-sentinel >/dev/null; \
		{ $$SUDO systemctl disable --now redis-sentinel || $$SUDO service redis-sentinel stop; } >/dev/null 2>&1 || true; \
	fi

proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# client/perito/_client.py (the sync SDK client) from _async.py, with unasync: edit _async.py,
# then run this (tests/unit/test_sdk_generated.py fails while the two differ).
sdk: $(STAMP)
	$(BIN)/python scripts/gen_sync_client.py

# docs/api.md, the API reference, from the comments in proto/ (a test fails when it is stale).
docs: $(STAMP)
	$(BIN)/python scripts/gen_api_docs.py

demo: install
	$(BIN)/python scripts/demo.py

# Rolling out a second version on the demo's registry: shadow, compare, canary, promote, drift
# (docs/rollouts.md quotes a run).
demo-rollout: install
	$(BIN)/python scripts/rollout_demo.py

# deploy/secrets/ (gitignored): TLS certificate, tenants file with an admin tenant (token in
# admin.token), random MinIO credentials, Kubernetes Secrets. Made once; never replaced.
deploy-secrets: $(STAMP)
	$(BIN)/python scripts/deploy_secrets.py

compose-up: deploy-secrets
	docker compose -f deploy/compose.yaml up -d

# The docs site (mkdocs.yml) is built with --strict into site/ (gitignored): a broken link fails
# (not with --quiet: mkdocs then counts no warnings, and strict passes anything).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/vulture client core server worker training scripts --min-confidence 80 --exclude "*_pb2*.py"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: install lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration tests/e2e

# Every use case end to end on generated data (the seed scenarios, tests/scenarios/): each
# recipe trains for a few epochs, is published and served, and is checked as its user would.
scenarios: install
	$(BIN)/pytest -m scenario tests/scenarios

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/classify.py

# What provenance, the prediction log (off, local, dead store), the quality gate and an
# explanation cost, as ratios in one run (docs/trust.md#what-it-costs); 2 to 3 minutes.
bench-trust: install
	$(BIN)/python bench/trust.py

# Classify's c16 p99 with a shadow at sample 1.0 over without, in one run; about a minute.
bench-shadow: install
	$(BIN)/python bench/shadow.py

# The bulk-job control plane at a million items (bench/scale.py): a model that ignores its input,
# tiny images, 4 worker processes; prints Redis bytes per item during and after, submission time,
# items/s, time to first result and ListJobResults' paging. About 15 minutes on 2 cores; not in
# `test`.
bench-scale: install
	$(BIN)/python bench/scale.py

# The fault suite: real redis-server (append-only file on), workers and server killed,
# overload, retention, a worker host cut off its network (namespaces: as root, else SKIP), the
# Redis primary killed under Sentinel and a replica promoted; zero items lost or duplicated.
# 3 to 5 minutes on 2 cores; not in `test`: .ci/run runs it, and `scenarios`, after `test`.
faults: install
	$(BIN)/python bench/faults.py

# The figure in docs/training.md: Fashion-MNIST test accuracy from training for 18.75 minutes
# (train.max_minutes) on 2 CPU cores; the whole command takes under 20 minutes.
train-fashion-mnist: install
	$(BIN)/perito train training/recipes/fashion-mnist.yaml --out runs/fashion-mnist-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf var runs build .mypy_cache .ruff_cache .pytest_cache
