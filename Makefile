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

.PHONY: install test test-all demo bench lint mutation clean

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

# The main jobs on the embedded data: train the tiny digits DDPM, an adversarially trained CNN and
# a judge CNN (each only when its cache folder is empty), draw unguided DDIM samples, then
# robust-energy guided samples toward each seed's label, and compare the judge's accuracy of
# guided and unguided samples; invariant sets of digits (Algorithm 1 against the guidance
# baseline) and the circles figure; ACE counterfactuals of digits. Prints where the images and
# metrics are.
define train_once
	@if [ -f "$(EQUIDIFF_CACHE)/$(1)/$(2)" ]; then \
	  echo "using the cached $(1) in $(EQUIDIFF_CACHE)/$(1) (delete it to retrain)"; \
	else \
	  $(EQ) fit experiment=$(3); \
	fi
endef

demo: install
	$(call train_once,digits_ddpm,model_index.json,digits/ddpm)
	$(call train_once,digits_robust_cnn,model.safetensors,digits/robust_classifier)
	$(call train_once,digits_judge_cnn,model.safetensors,digits/judge_classifier)
	$(EQ) predict experiment=digits/sample
	$(EQ) predict experiment=digits/robust_energy
	$(EQ) predict experiment=digits/robust_energy guidance.scale=0 task_name=digits_robust_energy_unguided
	@echo
	@echo "unguided DDIM samples:  outputs/digits_sample/ (grid.png, samples.npz, samples/, metrics.json)"
	@echo "robust-energy guided:   outputs/digits_robust_energy/ (same files; labels 0..9 in turn)"
	@echo "the same seeds unguided: outputs/digits_robust_energy_unguided/"
	@echo
	@$(PY) -m equidiff.report outputs/digits_robust_energy outputs/digits_robust_energy_unguided \
	  --keys judge/accuracy judge/mean_confidence energy/mean_joint_energy energy/mean_energy \
	  precision_recall/precision precision_recall/recall
	@echo
	$(EQ) predict experiment=digits/invariant
	$(EQ) predict experiment=digits/invariant method.mode=guidance task_name=digits_invariant_guidance
	@echo "invariant sets (Algorithm 1): outputs/digits_invariant/ (queries.png: each query, then its samples)"
	@echo "guidance baseline, same seeds: outputs/digits_invariant_guidance/"
	@$(PY) -m equidiff.report outputs/digits_invariant outputs/digits_invariant_guidance \
	  --keys invariance_error converged iterations diversity
	$(call train_once,circles_mlp,model.safetensors,invariant/circles_mlp)
	$(call train_once,circles_ddpm,denoiser/config.json,invariant/circles_ddpm)
	$(EQ) predict experiment=invariant/circles
	@echo "circles (Fig. 3.1):     outputs/invariant_circles/circles.png"
	@$(PY) -m equidiff.report outputs/invariant_circles --keys invariance_error converged iterations diversity
	@echo
	$(EQ) predict experiment=digits/ace
	@echo "ACE counterfactuals:    outputs/digits_ace/ (explanations.png: input | pre-explanation | mask | counterfactual; grid.png, samples/, metrics.json)"
	@$(PY) -m equidiff.report outputs/digits_ace --keys flip_rate/flip_rate flip_rate/input_flip_rate \
	  flip_rate/pre_explanation_flip_rate edit_size/mask_area edit_size/l1 judge/accuracy

# Benchmarks (ratios measured side by side in one run); results go to bench/results.json and
# the tables in bench/README.md are written from them.
bench: install
	$(PY) -m bench.run

# Mutation check of the core maths (guidance, invariant, proximal operators, metrics, samplers) with mutmut;
# not part of `make test` (hours on 2 CPU cores). Configuration: [tool.mutmut] in pyproject.toml; results in
# mutants/ (`mutmut results`, `mutmut show NAME`); the surviving mutants are listed in the README.
mutation: install
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children $${MUTATION_JOBS:-2}
	$(VENV)/bin/mutmut results

lint: install
	$(VENV)/bin/ruff check equidiff tests bench

clean:
	rm -rf outputs .pytest_cache mutants
