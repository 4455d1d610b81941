# hfprune: set-up, tests and the demo. `make install demo` for the demo, `make test` for the tests.
PYTHON ?= python
# Installed first, on its own: an unpinned torch on a machine without one would pull GBs of CUDA packages.
TORCH ?= torch==2.13.0

.PHONY: install test demo lint

install:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev,bench]"
	PYTHON=$(PYTHON) bash benchmarks/install_assets.sh

test:
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q tests

demo:
	$(PYTHON) -m hfprune run

lint:
	$(PYTHON) -m ruff check .
