# Quick start: `make demo` and `make test`. Both create .venv from requirements*.txt when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: demo test test-slow bench clean-venv

$(VENV)/.runtime-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PIP) install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime-installed
	$(PY) scripts/build_references.py --out references
	$(PY) class_neurons_fvis.py --json_cfg presets/quickstart_efficientnet.json

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
