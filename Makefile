# Two commands do all set-up: `make run` (embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Web, workers for each queue and beat under honcho, on SQLite + the file-system broker
# unless DATABASE_URL / REDIS_URL say otherwise.
run: install
	mkdir -p instance
	$(BIN)/flask --app run db upgrade
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start web worker emails batch beat flower

# The whole suite against real PostgreSQL and Redis (see tests/conftest.py for the URLs).
test: install
	$(BIN)/pytest

bench: install
	command -v wrk >/dev/null 2>&1 || { apt-get update && apt-get install -y wrk; }
	$(BIN)/python bench/run.py --repeat 3 --duration 8

clean:
	rm -rf $(VENV) instance .pytest_cache
