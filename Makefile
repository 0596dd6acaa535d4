PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test test-fast test-postgres lint format bench bench-throughput bench-gateway bench-usage bench-console clean

# The virtual environment, rebuilt when the pinned requirements change.
$(INSTALLED): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(INSTALLED)

# The browser the console's tests drive (tests/test_console.py): Debian's chromium, installed
# when missing; apt-get needs root, as CI has.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver

run: $(INSTALLED)
	$(BIN)/flask --app app db upgrade
	$(BIN)/flask --app app users bootstrap
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# Three processes (on two cores: the server tests spend much of their time waiting on their
# servers) for every test but those that time answers under load; then those, one at a time,
# with nothing else running.
test: $(INSTALLED) lint $(CHROMIUM)
	$(BIN)/python -m pytest -m "not timed" -n 3
	$(BIN)/python -m pytest -m timed

# Every test that runs in process (no server, nothing that runs for seconds): under a minute.
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow" -n 3

# The suite on PostgreSQL: a database per test, copied from a migrated template. The
# default is what `.ci/start-postgres` sets up on this machine's PostgreSQL 15.
TEST_DATABASE_URL ?= postgresql+psycopg://registry_test:registry_test@127.0.0.1:5432/registry_test
test-postgres: $(INSTALLED) $(CHROMIUM)
	TEST_DATABASE_URL='$(TEST_DATABASE_URL)' $(BIN)/python -m pytest -m "not timed" -n 3
	TEST_DATABASE_URL='$(TEST_DATABASE_URL)' $(BIN)/python -m pytest -m timed

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The model index and the prober at 100 and 1000 providers (bench/README.md).
bench: $(INSTALLED)
	$(BIN)/python bench/catalog.py

# The registry against a bare Flask app under the same gunicorn configuration (bench/README.md).
bench-throughput: $(INSTALLED)
	$(BIN)/python bench/throughput.py

# What the gateway adds against calling a local fake model server directly (bench/README.md).
bench-gateway: $(INSTALLED)
	$(BIN)/python bench/gateway.py

# The usage report at a million usage events (bench/README.md); BENCH_DATABASE_URL=postgresql+psycopg://... for PostgreSQL.
bench-usage: $(INSTALLED)
	$(BIN)/python bench/usage.py $(if $(BENCH_DATABASE_URL),--database-url '$(BENCH_DATABASE_URL)')

# A page of 1000 providers rendered by the console, server-side (bench/README.md).
bench-console: $(INSTALLED)
	$(BIN)/python bench/console.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
