# One entry point for people and CI: `make serve`, `make test`. Everything goes into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel cython numpy

# gfpgan/basicsr/facexlib go in with --no-deps: see pyproject.toml, extra `server`.
$(STAMP): $(BIN)/python pyproject.toml requirements/gfpgan-nodeps.txt
	$(BIN)/pip install -q -e '.[server,dev]'
	$(BIN)/pip install -q --no-deps --no-build-isolation -r requirements/gfpgan-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/gfpgan-serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto:
	$(BIN)/python scripts/gen_proto.py
