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
# unless DATABASE_URL / REDIS_URL say otherwise. One Ctrl-C stops them all (run_local.py).
run: install
	mkdir -p instance
	$(BIN)/flask --app run db upgrade
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python run_local.py start web worker emails batch beat flower

# The whole suite against real PostgreSQL and Redis (see tests/conftest.py for the URLs), three
# test processes side by side (each with its own database and Redis db; a module stays in one).
test: install
	$(BIN)/pytest -n 3 --dist loadfile

# Intake beside the stock design (bench/stock/), each on Redis and on RabbitMQ (a vhost of the
# run's own; the repeats take turns), single events with and without a per-app rate limit, one
# `celery worker -c 2` per queue for both designs: about 11 minutes.
bench: install
	command -v wrk >/dev/null 2>&1 || { apt-get update && apt-get install -y wrk; }
	$(BIN)/python bench/run.py --repeat 2 --duration 6 --designs intake,stock --broker both --rate-limit both --worker-concurrency 2

clean:
	rm -rf $(VENV) instance .pytest_cache
