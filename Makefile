# The two commands of the README: `make demo` runs the live system, `make test` the tests.
# Both set up what they need first (virtual environment, PostgreSQL with pg_cron) and can
# be run again at any time.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CHAOS ?=

.PHONY: setup system-deps lint test demo clean

setup: system-deps $(VENV)/.installed

system-deps:
	@bash scripts/ensure-system-deps.sh

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "pglive needs Python 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

demo: setup
	$(BIN)/python -m pglive.demo $(if $(CHAOS),--chaos,)

clean:
	-$(BIN)/python -m pglive db stop
	rm -rf $(VENV) .pglive .pytest_cache .ruff_cache
