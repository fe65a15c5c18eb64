# segfast: the two commands are `make demo` and `make test`; both set up .venv first.
#
# TORCH_SPEC picks the PyTorch build the venv gets when it has none yet. The
# default is the release CI tests on (a CPU build on CI's disk; the CUDA build
# from PyPI on a GPU machine). Keep a torch you already have with
#   make test PYTHON=/path/to/python-with-torch  VENV_FLAGS=--system-site-packages
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
# Two xdist workers, a test module to one worker: its expensive fixtures (the `segfast
# serve` service, a Ray cluster) start once, not once per worker; the longest modules
# first (tests/conftest.py, from tests/module_seconds.json), not the most numerous.
PYTEST_FLAGS ?= -n 2 --dist loadscope --no-loadscope-reorder

.PHONY: setup test lint format demo bench clean

# --no-compile: pip would write bytecode for every module of every package (Ray, SciPy,
# scikit-image, ...), ~40 s of a cold setup on 2 cores; Python compiles what is imported.
PIP_INSTALL := $(PY) -m pip install --quiet --no-compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: setup lint
	$(PY) -m pytest $(PYTEST_FLAGS) tests

demo: setup
	$(PY) -m segfast.demo

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache out
