# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/magnetic-tile
DEMO   ?= runs/demo

PEERS  := .venv-peers

.PHONY: demo demo-loop test test-fast lint screenshots bench bench-peers soak install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamp files: reinstall when pyproject.toml or the pins change. constraints.txt holds every version the
# suite passed with, so a fresh machine (and CI) lints and tests exactly those.
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The live agent on the Magnetic Tile test split; the default model is trained (and evaluated
# offline) first when $(DEMO)/model holds none.
demo: $(VENV)/.installed
	@if [ ! -f $(DEMO)/model/manifest.json ]; then \
		$(VENV)/bin/adtr-edge train --data $(DATA) --out $(DEMO)/model && \
		$(VENV)/bin/adtr-edge eval --model $(DEMO)/model --data $(DATA) --report $(DEMO)/report.json --out $(DEMO); \
	fi
	$(VENV)/bin/adtr-edge demo --model $(DEMO)/model --data $(DATA) --out $(DEMO)/live

# Learning on the line: the same model in a registry, the lighting drifts, false alarms are accepted, a
# retrain runs as a Ray job, the candidate is shadowed and promoted, false alarms fall.
demo-loop: $(VENV)/.installed
	@if [ ! -f $(DEMO)/model/manifest.json ]; then \
		$(VENV)/bin/adtr-edge train --data $(DATA) --out $(DEMO)/model; \
	fi
	rm -rf $(DEMO)/loop
	$(VENV)/bin/adtr-edge demo --loop --model $(DEMO)/model --data $(DATA) --out $(DEMO)/loop

# The console's browser tests drive Debian's chromium (Playwright's Python API, the system browser; its
# own browser download is never used): tests/install_browser.sh installs it where it can (root + apt).
test: $(VENV)/.installed-test
	bash tests/install_browser.sh
	$(PY) -m pytest tests

# The quick lane: tests/unit only (no Ray, no live agent, no browser), under 3 minutes on 2 cores.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest tests/unit

# Lint and type check (run by .ci/run before the tests).
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The README's console screenshots, produced by the browser test itself.
screenshots: $(VENV)/.installed-test
	bash tests/install_browser.sh
	ADTR_TESTS_SCREENSHOTS=docs/screenshots $(PY) -m pytest tests/integration/test_console_browser.py

bench: $(VENV)/.installed-test
	$(PY) tests/benchmarks/bench_model.py --data $(DATA) --out runs/bench
	$(PY) tests/benchmarks/bench_agent.py --data $(DATA) --model runs/bench/adtr-edge --out runs/bench
	$(PY) tests/benchmarks/bench_learning.py --data $(DATA) --model runs/bench/adtr-edge --out runs/bench
	bash tests/install_browser.sh
	$(PY) tests/benchmarks/bench_console.py --data $(DATA) --model runs/bench/adtr-edge --out runs/bench

# Hours on one box: four cameras at half capacity, retrains and promotions, a hostile peer; memory, files,
# object store, logs, latency and books every minute (docs/results.md#soak-hours-on-one-box).
SOAK_MINUTES ?= 60
soak: $(VENV)/.installed-test
	$(PY) tests/benchmarks/soak.py --data $(DATA) --model runs/bench/adtr-edge --out runs/soak --minutes $(SOAK_MINUTES)

# anomalib's PaDiM and PatchCore beside ADTR, in their own virtualenv (anomalib pins its own Lightning stack),
# with the same offline backbone weights, split and resolution; rewrites the README's peers table.
$(PEERS)/.installed: tests/benchmarks/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -r tests/benchmarks/peers-requirements.txt
	touch $@

bench-peers: $(VENV)/.installed-test $(PEERS)/.installed
	@if [ ! -f runs/bench/adtr-edge/manifest.json ]; then \
		$(PY) tests/benchmarks/bench_model.py --data $(DATA) --out runs/bench --only mt; \
	fi
	$(PY) tests/benchmarks/bench_peers.py --data $(DATA) --model runs/bench/adtr-edge --out runs/bench \
		--peers-python $(PEERS)/bin/python

clean:
	rm -rf runs .pytest_cache
