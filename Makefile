# muse-pipeline. `make demo` and `make test` work on a fresh machine by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MUSE := $(VENV)/bin/muse
STAMP := $(VENV)/.installed-stamp
# See muse_pipeline/__init__.py: torch's and numba's OpenMP pools must not spin against each other.
export OMP_WAIT_POLICY ?= PASSIVE

# reproduction targets (override on the command line: make reproduce-msrvtt EPOCHS=1 MODEL=muse-tiny PRETRAINED=)
MODEL ?= ViT-B-32
PRETRAINED ?= openai
FRAMES ?=
EPOCHS ?=
HEAD ?= muse
EXTRA ?=
MSRVTT_ROOT ?= data/msrvtt
DIDEMO_ROOT ?= data/didemo
ACTIVITYNET_ROOT ?= data/activitynet
REPRO_ARGS = --model "$(MODEL)" --pretrained "$(PRETRAINED)" --head $(HEAD) \
	$(if $(FRAMES),--frames $(FRAMES)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(EXTRA)

.PHONY: install test demo lint gpu-check bench reproduce-msrvtt reproduce-didemo reproduce-activitynet clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(MUSE) demo

lint: install
	$(VENV)/bin/ruff check muse_pipeline stages cli tests benchmarks

# On a CUDA machine, < 8 min on one H100: the `cuda` extra (mamba-ssm, causal-conv1d) unless it already
# imports (capped at 2 min: an offline card or a source build must not eat the budget; the kernel rows
# then say the kernels are missing), then ONE markdown table, also written to gpu-check.md.
# CPU self-test of the script: $(PY) benchmarks/gpu_check.py --quick
GPU_CHECK_OUT ?= gpu-check.md
gpu-check: install
	@$(PY) -c "import mamba_ssm, causal_conv1d" 2>/dev/null || \
		timeout 120 $(PY) -m pip install -q --retries 0 --timeout 10 -e '.[cuda]' --no-build-isolation || \
		echo "gpu-check: the cuda extra did not install; continuing with the torch paths"
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

bench: install
	$(PY) benchmarks/scan.py
	$(PY) benchmarks/fusion.py
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval.py

reproduce-msrvtt: install
	$(MUSE) reproduce msrvtt --data-root "$(MSRVTT_ROOT)" $(REPRO_ARGS)

reproduce-didemo: install
	$(MUSE) reproduce didemo --data-root "$(DIDEMO_ROOT)" $(REPRO_ARGS)

reproduce-activitynet: install
	$(MUSE) reproduce activitynet --data-root "$(ACTIVITYNET_ROOT)" $(REPRO_ARGS)

clean:
	rm -rf runs results demo .pytest_cache
