# Two commands on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

OFFICIAL_VENV ?= .venv-official

.PHONY: install install-cpu install-dev install-convert official-env test test-fast test-min lint demo demo-clean reproduce bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# PyPI's torch for Linux brings CUDA (nvidia-*, triton: .venv 6.3 GB). install-cpu, run first on a fresh
# clone (or after make clean), takes torch and torchvision (bounds from requirements.txt) from PyTorch's
# CPU wheel index, then the rest as install does (.venv about 1.8 GB); make demo / make test then keep it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

install-cpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --index-url $(TORCH_CPU_INDEX) $$(grep -oE '^torch(vision)?>=[0-9.]+' requirements.txt)
	$(MAKE) install

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# The converter (extract/convert_official.py) needs TensorFlow beside requirements.txt.
install-convert: $(VENV)/.installed-convert

$(VENV)/.installed-convert: $(VENV)/.installed requirements-convert.txt
	$(PY) -m pip install -r requirements-convert.txt
	touch $@

# The converter's tests compare with the official network built in TensorFlow 2.12 + tf-slim, which
# needs its own environment (numpy < 2); `make test` runs those tests when it exists.
official-env: install-convert $(OFFICIAL_VENV)/.installed

$(OFFICIAL_VENV)/.installed: tests/official/requirements.txt
	test -x $(OFFICIAL_VENV)/bin/python || $(PYTHON) -m venv $(OFFICIAL_VENV)
	$(OFFICIAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OFFICIAL_VENV)/bin/python -m pip install -r tests/official/requirements.txt
	touch $@

test: install-dev
	@test -x $(OFFICIAL_VENV)/bin/python || echo "note: $(OFFICIAL_VENV) is missing, so the official-model tests \
	(tests/test_official.py) that need TensorFlow are skipped; build it with: make official-env"
	$(PY) -m pytest --durations=20

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

# A published result from nothing: make reproduce SETUP=delf_v1_roxf_asmk_sp (several: SETUP="a b"; the names:
# python extract/reproduce.py --list). Downloads into repo/data and repo/parameters, converts with TensorFlow.
reproduce: install-convert
	@test -n "$(SETUP)" || { echo "usage: make reproduce SETUP=<name> (names: $(PY) extract/reproduce.py --list)"; exit 2; }
	$(PY) extract/reproduce.py $(SETUP)

bench: install-dev
	for b in tests/bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(OFFICIAL_VENV)
