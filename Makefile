# FedDLR — two commands: `make demo` and `make test` (`make bench`: benchmarks, long).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch; a GPU site overrides it, e.g. `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA ?= data/demo
DEMO_OUT  ?= runs/demo

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install dev demo test bench browser lint settings clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# pyradiomics 3.1.0 on PyPI has broken metadata; building 3.0.1 from source without build
# isolation (numpy, setuptools, versioneer and wheel already present) works with numpy 2.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "numpy>=2" setuptools versioneer wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import radiomics" 2>/dev/null || $(PIP) install -q --no-build-isolation "pyradiomics==3.0.1"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

# Paper 1's design: centre-1 trains, centre-2 validates externally, centre-3 is the
# HER2-negative survival cohort; HER2-low vs zero, KM curves by true and predicted status.
demo: install
	$(VENV)/bin/feddlr simulate --design paper1 --patients 60 --seed 7 --effect-size 2 \
		--out $(DEMO_DATA)
	$(VENV)/bin/feddlr run --sites-dir $(DEMO_DATA) --out $(DEMO_OUT) -c task=her2-low \
		-c survival-group=label,predicted:dlr

test: dev browser
	$(VENV)/bin/python -m pytest -q tests

# The report test opens report.html in Debian's chromium; installed here when missing and
# possible (root, apt-get), otherwise that test skips with a message.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && timeout 600 sh -c 'apt-get update -qq && apt-get install -y -qq chromium' >/dev/null 2>&1 \
	  || echo "chromium not installed: the browser test of report.html will skip"; }

# Long (about 25-30 min on 2 cores, most of it the CNN learning part): every figure of docs/BENCHMARKS.md, one line each, and
# bench/results.json. `make bench BENCH_ARGS=--quick` is a few-minute smoke run.
BENCH_ARGS ?=
bench: dev
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

lint: dev
	$(VENV)/bin/ruff check .

# the run-config table of pyproject.toml and the README's key tables, from shared/settings.py;
# docs/QUERIES.md from shared/queries
settings: install
	$(PY) -m simulation.settings_docs

clean:
	rm -rf $(VENV) runs data/demo
