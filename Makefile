# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/magnetic-tile
DEMO   ?= runs/demo

.PHONY: demo demo-loop test bench install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamp files: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
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

test: $(VENV)/.installed-test
	$(PY) -m pytest tests

bench: $(VENV)/.installed-test
	$(PY) tests/benchmarks/bench_model.py --data $(DATA) --out runs/bench
	$(PY) tests/benchmarks/bench_agent.py --data $(DATA) --model runs/bench/adtr-edge --out runs/bench
	$(PY) tests/benchmarks/bench_learning.py --data $(DATA) --model runs/bench/adtr-edge --out runs/bench

clean:
	rm -rf runs .pytest_cache
