# The two commands of the README: `make demo` runs the tour, `make test` runs every test.
# Both install what they need first (PostgreSQL, pgvector, plpython3u, Python packages).
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup demo test lint bench

setup:
	bash docker/install-host.sh
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "pyembed needs Python 3.11 or newer"; exit 1; }
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(VENV)/bin/python -c 'import pyembed.cli' || { echo "pyembed did not install"; exit 1; }

demo: setup
	$(VENV)/bin/pyembed demo

lint: setup
	$(VENV)/bin/ruff check pyembed tests alembic
	$(VENV)/bin/mypy

# Two pytest-xdist workers, each with a PostgreSQL cluster of its own (tests/conftest.py):
# a test's time is spent on the CPU, of the test process and of the server, in turn.
# loadfile: a module's tests on one worker (their module-wide fixtures, clusters, ports).
test: setup lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: setup
	$(VENV)/bin/python tests/benchmarks/bench_suite.py --no-langchain
