# livepred — set-up, tests, demo. Everything runs from a local .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; any other spec pulls gigabytes of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[all,test]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check daemon handlers tests
	$(BIN)/mypy daemon handlers

demo: $(STAMP)
	$(BIN)/livepred demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/livepred bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
