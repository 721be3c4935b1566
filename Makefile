# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench fuzz install dev browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'

serve: install
	$(BIN)/corral serve

# The browser tests drive Debian's chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }

# The Postgres tests use the server CORRAL_TEST_PG names (postgresql://postgres@127.0.0.1:5432/test by
# default) when it answers, else a throwaway one scripts/test_postgres.py starts (installing Debian's
# postgresql with apt when it is missing) and removes after pytest.
# Most tests wait on real servers and processes, not the CPU: several workers finish sooner even on
# two cores. A file's tests stay on one worker (--dist loadfile): some share a module's server.
PYTEST_WORKERS ?= 3
test: dev browser
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/python scripts/test_postgres.py $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The benchmark suite (docs/benchmarks.md): `make bench`, or e.g. `make bench BENCH="--quick"`,
# `make bench BENCH="throughput isolation"`, `make bench BENCH="--write-docs"`.
BENCH ?=
bench: dev
	$(BIN)/python -m bench $(BENCH)

# Schemathesis against a fresh server from its own OpenAPI document, every phase (docs/security.md);
# the suite runs a short version. Options go to schemathesis: `make fuzz FUZZ="--max-examples 50"`.
FUZZ ?=
fuzz: dev
	$(BIN)/python scripts/fuzz_openapi.py $(FUZZ)

clean:
	rm -rf $(VENV) .corral .pytest_cache .mypy_cache
