# Quick start: `make demo` and `make test`. Both create .venv and install the project into it
# (pip install -e ., with the "dev" extra for the tests) when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: demo test test-slow gallery clean-venv

$(VENV)/.runtime-installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: pyproject.toml requirements-dev.txt $(VENV)/.runtime-installed
	$(PIP) install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime-installed
	$(PY) scripts/build_references.py --out references
	$(PY) class_neurons_fvis.py --json_cfg presets/quickstart_efficientnet.json

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m slow

gallery: $(VENV)/.runtime-installed
	$(PY) scripts/make_gallery.py --out docs/gallery.jpg

clean-venv:
	rm -rf $(VENV)
