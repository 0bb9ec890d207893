# optmon — the two commands: `make up` (install + run the embedded stack with a replay) and `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install protos up up-noreplay test lint bench clean

## install: Debian packages that are missing, .venv, Python deps, generated protos (idempotent, quick when done)
install:
	./scripts/install.sh

## protos: regenerate gen/optmon/v1 and gateway/optmon.pb from protos/
protos:
	PYTHON=$(PY) ./scripts/gen_protos.sh

## up: the embedded stack (PostgreSQL, Redis, ingest, query, stream, Envoy) replaying the 18-Aug-2026 NIFTY day
up: install
	$(VENV)/bin/optmon up

## up-noreplay: the same stack without the replay
up-noreplay: install
	$(VENV)/bin/optmon up --no-replay

## test: everything CI runs — install, ruff, the whole pytest suite (unit, integration, e2e); both always run, and
## the target fails when either fails (pytest's exit 5, "no tests collected", is a failure too)
test: install
	@rc=0; $(VENV)/bin/ruff check . || rc=1; $(VENV)/bin/pytest tests || rc=$$?; exit $$rc

## lint: ruff + mypy
lint: install
	@rc=0; $(VENV)/bin/ruff check . || rc=1; $(VENV)/bin/mypy services benchmarks || rc=1; exit $$rc

## bench: every benchmarks/bench_*.py against shared private PostgreSQL/Redis; table + .bench/results.json
bench: install
	$(PY) -m benchmarks.run

## clean: stop nothing, remove generated and local state (.optmon data, caches, generated code)
clean:
	rm -rf .optmon .bench .artifacts .pytest_cache .mypy_cache .ruff_cache gen gateway/optmon.pb
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
