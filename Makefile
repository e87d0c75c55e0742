# fedrisk: two commands on a fresh machine.
#   make demo  - create .venv, install, run the main job on embedded defaults
#   make test  - same install, then the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-integration test-e2e install bench clean flwr-run browser

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "fedrisk needs $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned first so nothing pulls a newer (CUDA) build
	$(BIN)/python -m pip install --quiet "torch>=2.6,<2.14"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedrisk demo $(ARGS)

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier: every unit-level test file, no federation or engine (under two minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

# The other two tiers (`make test` runs all three).
test-integration: $(STAMP)
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

test-e2e: $(STAMP) browser
	$(BIN)/python -m pytest -m e2e $(PYTEST_ARGS)

# The dashboard's browser test drives Debian's Chromium through ChromeDriver.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium and chromium-driver for the browser test"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

bench: $(STAMP)
	$(BIN)/python bench/overheads.py $(ARGS)

clean:
	rm -rf $(VENV) runs

# `flwr run .` on Flower's own launcher (local SuperLink + simulation) with this .venv:
# runtime dependency installation is disabled, or uv would fetch PyPI's CUDA build of torch.
flwr-run: $(STAMP)
	test -d runs/flwr/data || $(BIN)/fedrisk data synth --hospitals 3 --patients 15000 --out runs/flwr/data
	test -f runs/flwr/keys/hospital.ckks || $(BIN)/fedrisk keys init --out runs/flwr/keys
	test -d runs/flwr/nodes || $(BIN)/fedrisk node provision --data runs/flwr/data --key-file runs/flwr/keys/hospital.ckks --out runs/flwr/nodes --budget credit-risk-research=10
	PATH="$(CURDIR)/$(BIN):$$PATH" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 $(BIN)/flwr run . --stream
