# muse-pipeline. `make demo` and `make test` work on a fresh machine by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MUSE := $(VENV)/bin/muse
STAMP := $(VENV)/.installed-stamp

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

# On a CUDA machine: try the `cuda` extra (mamba-ssm, causal-conv1d), run the CUDA tests and the
# fusion benchmark on the GPU, print one table.
gpu-check: install
	-$(PY) -m pip install -q -e '.[cuda]' --no-build-isolation
	$(PY) benchmarks/gpu_check.py

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
