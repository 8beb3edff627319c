# Two commands on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-dev test test-fast test-min lint demo demo-clean bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -r requirements.txt
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

test: install-dev
	$(PY) -m pytest

test-fast: install-dev
	$(PY) -m pytest -m "not slow"

# the lower bounds (requirements-min.txt) installed over .venv's packages, without their
# dependencies: lint, the quick tests and the notebook
test-min: install-dev
	rm -rf $(VENV)/min-bounds
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/min-bounds -r requirements-min.txt
	$(VENV)/min-bounds/bin/ruff check .
	PYTHONPATH=$(VENV)/min-bounds $(PY) -m pytest -m "not slow"
	PYTHONPATH=$(VENV)/min-bounds $(PY) -m pytest tests/test_demo.py -k notebook

lint: install-dev
	$(PY) -m ruff check .

demo: install
	$(PY) extract/demo.py

demo-clean:
	rm -rf "$${DELF_REPO_DIR:-repo}/demo"

bench: install-dev
	for b in tests/bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV)
