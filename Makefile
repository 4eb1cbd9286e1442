# equidiff: `make demo` and `make test` work on a fresh machine (they install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EQ := $(VENV)/bin/equidiff
STAMP := $(VENV)/.installed-stamp
EQUIDIFF_CACHE ?= .cache/equidiff
export EQUIDIFF_CACHE
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install test test-all demo bench lint clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch comes from the registry (its default,
# CUDA-enabled build, which also runs on CPU); see DEVELOPERS.md.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

# The default suite (tests marked slow are left out): well under 20 minutes on 2 CPU cores.
test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q

# The main job on the embedded data: train the tiny digits DDPM (only when the cache is empty),
# then draw DDIM samples from it; prints where the images and metrics are.
demo: install
	@if [ -f "$(EQUIDIFF_CACHE)/digits_ddpm/model_index.json" ]; then \
	  echo "using the cached digits DDPM in $(EQUIDIFF_CACHE)/digits_ddpm (delete it to retrain)"; \
	else \
	  $(EQ) fit experiment=digits/ddpm; \
	fi
	$(EQ) predict experiment=digits/sample
	@echo
	@echo "demo outputs: outputs/digits_sample/ (grid.png, samples.npz, samples/, metrics.json)"
	@cat outputs/digits_sample/metrics.json

# Benchmarks (ratios measured side by side in one run); results go to bench/results.json and
# the tables in bench/README.md are written from them.
bench: install
	$(PY) -m bench.run

lint: install
	$(VENV)/bin/ruff check equidiff tests bench

clean:
	rm -rf outputs .pytest_cache
