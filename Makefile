# The two front-door commands: `make test` and `make demo`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv test test-slow test-all lint format demo bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	# deepspeed's setup imports torch: build it against the torch above, not a fresh CUDA wheel.
	$(PY) -m pip install --no-build-isolation "deepspeed>=0.14"
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check cn_clip tests benchmarks
	$(PY) -m ruff format --check cn_clip tests benchmarks

format: venv
	$(PY) -m ruff check --fix cn_clip tests benchmarks
	$(PY) -m ruff format cn_clip tests benchmarks

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything the default suite leaves out (slow, reliability); CI runs it after `make test`.
test-slow: venv
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

test-all: test test-slow

demo: venv
	$(PY) -m cn_clip.demo

clean-venv:
	rm -rf $(VENV)
