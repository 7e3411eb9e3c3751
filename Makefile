# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is not on a fresh machine; this pin is a CPU build available locally. Any torch>=2.4 works.
TORCH_PIN ?= torch==2.13.0
# A hung test fails the run at 45 minutes (pytest prints its summary on the interrupt) instead of holding
# CI to its limit; the suite takes about 10 minutes on a 2-core VM. Where coreutils' timeout is missing
# (macOS), the suite runs without it.
TEST_TIMEOUT := $(shell command -v timeout >/dev/null 2>&1 && echo timeout --signal=INT --kill-after=60 2700)

.PHONY: install demo test bench-gpu clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m cluster.demo

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"  # the layer contracts (pyproject.toml)
	$(TEST_TIMEOUT) $(PYTHON) -m pytest -q tests

clean:
	rm -rf demo_out .pytest_cache build *.egg-info
