# Two entry points: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdirs/digits
PYTEST_ARGS ?=

.PHONY: demo test install install-test clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m ddpm_jax.main --config=configs/digits.py --workdir=$(DEMO_WORKDIR)
	$(PY) -m ddpm_jax.main --config=configs/digits.py --workdir=$(DEMO_WORKDIR) --mode=eval

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)
