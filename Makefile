# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is not on a fresh machine; this pin is a CPU build available locally. Any torch>=2.4 works.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench-gpu clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m cluster.demo

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf demo_out .pytest_cache build *.egg-info
