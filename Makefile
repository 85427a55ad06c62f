# topk-distill developer commands. On a fresh machine, the first of these creates .venv
# (python3.11, else python3), installs requirements-dev.txt and builds the extension:
#
#   make test      build, then pytest tests/ and the C++ (CMake/CTest) tests
#   make demo      python -m demo
#   make bench     python -m benchmarks
#   make profile   python -m benchmarks.profile
#   make gpu-check on a lent GPU machine: build for its GPU, CUDA tests, compute-sanitizer,
#                  quick benchmark; summary + logs in GPU_CHECK_OUT (python -m tools.gpu_check).
#                  Uses PYTHON as it is (installs nothing): make gpu-check PYTHON=python3 GPU_CHECK_OUT=DIR
#   make sass      python -m tools.sass: static SASS instruction budget of the CUDA kernels
#                  for sm_90 (no GPU needed; nvcc + nvdisasm/cuobjdump, which torch's triton brings)
#   make build     (re)build topk_distill/_C*.so in place; incremental (ninja)
#   make setup     only the environment;  make clean (build outputs);  make distclean (+ .venv)
#
# Use an existing environment instead of .venv (e.g. a GPU box whose Python has its own torch):
#
#   make test PYTHON=/path/to/python
#
# That creates no .venv and installs no torch; of the other requirements-dev.txt packages it
# installs (unpinned) only those missing from that environment. PYTHON may also come from the
# environment (export PYTHON=...).
#
# requirements-nodeps.txt (verl) is installed with `pip install --no-deps` in both modes (pinned;
# in the PYTHON=... mode only when missing): the tests import a few of its modules, with
# test-only stand-ins for its heavy dependencies (tests/_verl_standins.py).
#
# Variables (also read from the environment):
#   TOPK_DISTILL_CUDA=auto|0|1  build the CUDA kernels: auto = when torch has CUDA and nvcc is
#                               found (no GPU needed); 1 = required; 0 = CPU only (setup.py)
#   TORCH_CUDA_ARCH_LIST        default: the visible GPUs, else "8.0;9.0"
#   MAX_JOBS                    parallel compile jobs (default 2)
#   PYTEST_ARGS                 extra pytest arguments, e.g. PYTEST_ARGS="-k rkl -x"
#   SASS_ARGS                   extra tools.sass arguments, e.g. SASS_ARGS="--files shard_pass"
#   CMAKE_TESTS=0               skip the CMake/CTest part of `make test`
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  PYTHON := $(VENV)/bin/python
  EXTERNAL_PYTHON :=
else
  EXTERNAL_PYTHON := 1
endif

TOPK_DISTILL_CUDA ?= auto
MAX_JOBS ?= 2
CMAKE ?= cmake
CMAKE_TESTS ?= 1
PYTEST_ARGS ?=
SASS_ARGS ?=
export TOPK_DISTILL_CUDA MAX_JOBS

# The environment's bin/ first, so that its ninja (a pip package) is the one torch and
# CMake find.
PY_BIN_DIR := $(abspath $(dir $(PYTHON)))
export PATH := $(PY_BIN_DIR):$(PATH)

BUILD_DIR := build
CMAKE_BUILD_DIR := $(BUILD_DIR)/cmake
# Stamps: which environment / build configuration the current outputs belong to.
PY_KEY := $(shell printf '%s' '$(abspath $(PYTHON))' | cksum | cut -d' ' -f1)
BUILD_KEY := $(shell printf '%s|%s|%s' '$(abspath $(PYTHON))' '$(TOPK_DISTILL_CUDA)' '$(TORCH_CUDA_ARCH_LIST)' | cksum | cut -d' ' -f1)
ifeq ($(EXTERNAL_PYTHON),)
  DEPS_STAMP := $(VENV)/.deps-stamp
else
  DEPS_STAMP := $(BUILD_DIR)/.deps-$(PY_KEY)
endif
BUILD_STAMP := $(BUILD_DIR)/.build-$(BUILD_KEY)
CSRC_FILES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.hpp' \) 2>/dev/null)
# No extension library at all (e.g. after `make clean` of another checkout): always build.
ifeq ($(wildcard topk_distill/_C*.so),)
  BUILD_FORCE := FORCE
endif

CMAKE_CUDA_OPT_auto := AUTO
CMAKE_CUDA_OPT_1 := ON
CMAKE_CUDA_OPT_0 := OFF
CMAKE_CUDA_OPT := $(or $(CMAKE_CUDA_OPT_$(TOPK_DISTILL_CUDA)),AUTO)

.PHONY: help setup build test test-python test-cpp demo bench profile sass gpu-check clean distclean FORCE

help:
	@sed -n '1,/^SHELL/p' Makefile | sed '$$d' | sed 's/^# \{0,1\}//'

# ---------------------------------------------------------------------------------------
setup: $(DEPS_STAMP)

ifeq ($(EXTERNAL_PYTHON),)
$(DEPS_STAMP): requirements-dev.txt requirements-nodeps.txt
	@if [ ! -x "$(PYTHON)" ]; then \
	  PY=$$(command -v python3.11 || command -v python3); \
	  [ -n "$$PY" ] || { echo "make setup: neither python3.11 nor python3 found" >&2; exit 1; }; \
	  echo "== creating $(VENV) with $$PY ($$($$PY --version))"; \
	  $$PY -m venv $(VENV); \
	fi
	@echo "== installing requirements-dev.txt into $(VENV) (a few minutes the first time: torch is ~5 GB)"
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(PYTHON) -m pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	@touch $@
else
$(DEPS_STAMP): requirements-dev.txt requirements-nodeps.txt
	@mkdir -p $(BUILD_DIR)
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "make: PYTHON=$(PYTHON) has no torch; install torch there first" >&2; exit 1; }
	@missing=$$($(PYTHON) -c '$(MISSING_PY)' requirements-dev.txt name); \
	nodeps=$$($(PYTHON) -c '$(MISSING_PY)' requirements-nodeps.txt line); \
	if [ -n "$$missing" ]; then \
	  echo "== installing into $(PYTHON): $$missing"; \
	  $(PYTHON) -m pip install --disable-pip-version-check -q $$missing || exit 1; \
	fi; \
	if [ -n "$$nodeps" ]; then \
	  echo "== installing into $(PYTHON) without dependencies: $$nodeps"; \
	  $(PYTHON) -m pip install --disable-pip-version-check -q --no-deps $$nodeps || exit 1; \
	fi; \
	if [ -z "$$missing$$nodeps" ]; then \
	  echo "== $(PYTHON) already has the dev requirements (torch $$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
	fi
	@touch $@
endif

# The requirements in file argv[1] that the PYTHON=... environment lacks (never torch): their
# names (unpinned) when argv[2] is "name", else the whole requirement lines (pinned).
MISSING_PY := import re, sys, importlib.metadata as md; \
  have = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in md.distributions()}; \
  reqs = [l.strip() for l in open(sys.argv[1]) if l.strip() and not l.lstrip().startswith("\#")]; \
  name = lambda r: re.split(r"[=<>!~; \[]", r)[0]; \
  print(" ".join((name(r) if sys.argv[2] == "name" else r) for r in reqs \
                 if name(r).lower() != "torch" and name(r).lower().replace("_", "-") not in have))

# ---------------------------------------------------------------------------------------
build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC_FILES) setup.py pyproject.toml $(BUILD_FORCE)
	@mkdir -p $(BUILD_DIR)
	@start=$$(date +%s); \
	$(PYTHON) setup.py -q build_ext --inplace || exit 1; \
	echo "== extension built in $$(( $$(date +%s) - start )) s: $$(ls topk_distill/_C*.so)"
	@rm -f $(BUILD_DIR)/.build-*
	@touch $@

# ---------------------------------------------------------------------------------------
test: build
	@$(MAKE) --no-print-directory test-python
	@if [ "$(CMAKE_TESTS)" != "0" ]; then $(MAKE) --no-print-directory test-cpp; fi

# pytest exit code 5 = no tests collected: not a failure while tests/ is being written.
test-python: build
	@echo "== pytest tests/"
	@$(PYTHON) -m pytest tests/ $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "== pytest: no Python tests collected"; rc=0; fi; \
	exit $$rc

test-cpp: $(DEPS_STAMP)
	@command -v $(CMAKE) >/dev/null || { echo "make: cmake not found (apt-get install cmake, or pip install cmake)" >&2; exit 1; }
	@echo "== C++ tests: CMake + CTest in $(CMAKE_BUILD_DIR) (TOPK_DISTILL_CUDA=$(CMAKE_CUDA_OPT))"
	@$(CMAKE) -S . -B $(CMAKE_BUILD_DIR) -G Ninja -Wno-dev --log-level=WARNING \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DTOPK_DISTILL_CUDA=$(CMAKE_CUDA_OPT) >$(BUILD_DIR)/cmake-configure.log 2>&1 \
	  || { cat $(BUILD_DIR)/cmake-configure.log; exit 1; }
	@grep -h "topk_distill:" $(BUILD_DIR)/cmake-configure.log || true
	$(CMAKE) --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)
	cd $(CMAKE_BUILD_DIR) && ctest --output-on-failure

# ---------------------------------------------------------------------------------------
demo: build
	$(PYTHON) -m demo

bench: build
	$(PYTHON) -m benchmarks

profile: build
	$(PYTHON) -m benchmarks.profile

GPU_CHECK_OUT ?= benchmarks/results/gpu_check
gpu-check:
	$(PYTHON) -m tools.gpu_check --out $(GPU_CHECK_OUT)

# Reuses the nvcc flags of the build's ninja file, hence `build` first (incremental).
sass: build
	$(PYTHON) -m tools.sass $(SASS_ARGS)

clean:
	rm -rf $(BUILD_DIR) topk_distill/_C*.so *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

FORCE:
