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

# Bytecode: pip compiles every installed module on one core; compileall does the same on
# every core afterwards (a cold setup here: 189 -> 153 s). It is needed: where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every process would
# otherwise compile torch at import (+8 s each). Its exit status is ignored: some
# packages ship files no Python 3 compiles (test data; pip skips them as well).
PIP_INSTALL := $(PY) -m pip install --quiet --no-compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null 2>&1 || true
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
