# The two commands: `make demo` and `make test`. Each bootstraps .venv first.
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: demo test bootstrap lint bench

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m zoo.apps.demo

test: bootstrap
	$(VENV)/bin/ruff check zoo tests bench scripts
	$(PY) -m pytest $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check zoo tests bench scripts

bench: bootstrap
	cd bench && ../$(PY) registry.py && ../$(PY) train.py && ../$(PY) merge.py && ../$(PY) hub.py && ../$(PY) serve.py && ../$(PY) versions.py && ../$(PY) fairness.py && ../$(PY) ui.py && ../$(PY) domains.py && ../$(PY) dtype.py
