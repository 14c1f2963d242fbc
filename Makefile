# The two commands of the README: `make demo` (the main job end to end, embedded defaults) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch>=2.4"
	$(PIP) install -q -e ".[datasets]"

install-test: install
	$(PIP) install -q -e ".[test,datasets]"

demo: install
	$(PYTHON) -m cli service demo

test: install-test
	$(PYTHON) -m pytest
