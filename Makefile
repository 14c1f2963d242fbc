# The two commands of the README: `make demo` (the main job end to end, embedded defaults) and `make test`.
# `make lint`: ruff (lint, format check) and mypy, as configured in pyproject.toml; .ci/run runs it before the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test lint

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch>=2.4"
	$(PIP) install -q -e ".[datasets,lmeval]"

install-test: install
	$(PIP) install -q -e ".[test,lint,datasets,lmeval]"

# SERVE=1: keep the API, the worker and the dashboard up after the demo job, until Ctrl-C
demo: install
	$(PYTHON) -m cli service demo $(if $(SERVE),--serve)

test: install-test
	$(PYTHON) -m pytest

# all three checks run; the target fails if any of them failed
lint: install-test
	@rc=0; \
	echo "+ ruff check ."; $(PYTHON) -m ruff check . || rc=1; \
	echo "+ ruff format --check ."; $(PYTHON) -m ruff format --check . || rc=1; \
	echo "+ mypy"; $(PYTHON) -m mypy || rc=1; \
	exit $$rc
