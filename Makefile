# The two commands: `make demo` and `make test`. Each bootstraps .venv first.
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: demo test bootstrap lint bench

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m zoo.demo

test: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check zoo tests bench

bench: bootstrap
	$(PY) bench/registry.py
