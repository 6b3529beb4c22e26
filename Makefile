# gitract: `make demo` runs the whole pipeline on synthetic data; `make test` runs the tests.
# Both set everything up themselves on a fresh clone (a venv in .venv, installed once).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA_DIR   ?= data/synthetic
LABELS_DIR ?= data/synthetic_labels
FOLDS_CSV  ?= folds/folds.csv

.PHONY: setup data folds demo test lint format clean

# Re-installs only when pyproject.toml changes: a no-op in well under a second otherwise.
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

data: setup
	$(PY) scripts/make_synthetic.py --out $(DATA_DIR) --labels-out $(LABELS_DIR)

folds: setup
	$(PY) scripts/make_folds.py --data-dir $(DATA_DIR) --out $(FOLDS_CSV)

demo: data folds

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf data runs submissions/*.csv .pytest_cache
