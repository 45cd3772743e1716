# Quick start: `make demo` and `make test`. Both install what is missing first
# and work offline once everything is installed.
PY ?= python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
OUT ?=

.PHONY: deps sysdeps pydeps build demo test test-fast lint bench gpu-check cu-compile clean

sysdeps:
	@if [ ! -d "$(FMNIST_DIR)" ]; then \
	  echo "[make] installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }; \
	fi

# One interpreter start checks everything (each start imports torch: seconds on 2 cores); only when
# something is missing do the steps run one by one. torchattacks (the cross-check of tests/attacks)
# declares torchvision, which it never imports: --no-deps keeps the installed torch and pulls nothing
# else (scipy, its one other import, is in requirements.txt).
PYDEPS_IMPORTS := triton, numpy, scipy, ninja, pybind11, tqdm, matplotlib, pytest, pytest_benchmark, hypothesis, ruff
pydeps:
	@$(PY) -c "import torch, $(PYDEPS_IMPORTS), torchattacks" 2>/dev/null || { set -e; \
	  $(PY) -c "import torch" 2>/dev/null || { echo "[make] torch missing: installing torch==2.13.0"; \
	    $(PY) -m pip install torch==2.13.0; }; \
	  $(PY) -c "import $(PYDEPS_IMPORTS)" 2>/dev/null || $(PY) -m pip install -r requirements.txt; \
	  $(PY) -c "import torchattacks" 2>/dev/null || $(PY) -m pip install --no-deps torchattacks==3.5.1; }

deps: sysdeps pydeps

build: pydeps
	$(PY) -m pip install --no-build-isolation --no-deps -e .

# True when drp_kernels (with its compiled _C) and drp_train import from this checkout, not from
# an install of another one.
define INSTALLED_HERE
import os, drp_kernels.ops._C, drp_train
here = lambda m, d: os.path.samefile(os.path.dirname(m.__file__), d)
assert here(drp_kernels, "drp_kernels") and here(drp_train, "python/drp_train")
endef
export INSTALLED_HERE

# The headline in about 3 minutes on 2 CPU cores (results/README.md, "The demo"); the full
# comparison is `drp compare --preset full`. Builds unless this checkout is the one installed.
demo: deps
	@$(PY) -c "$$INSTALLED_HERE" 2>/dev/null || $(MAKE) --no-print-directory build
	$(PY) -m drp_train compare --preset demo --out demo_out --recertify results/fashion-mnist/certified

# Every test (the one test command; CI runs it). test-fast leaves out the `slow` ones, for local work.
test: deps build
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: deps build
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The lint gate CI runs before the tests: ruff ([tool.ruff] in pyproject.toml) and the test suite's own
# hygiene (tests that force the Triton backend use the kernel device; test files never import each other).
lint: pydeps
	$(PY) -m ruff check .
	$(PY) tools/check_test_hygiene.py

bench: build
	$(PY) -m pytest bench -q --benchmark-only $(if $(OUT),--benchmark-json=$(OUT)/bench.json,)

# Compile every CUDA source with plain nvcc (no torch headers) and setup.py's nvcc flags, as CI does.
cu-compile:
	@PY=$(PY) bash .ci/nvcc_check.sh

# The single command to run on a machine with a GPU: staged, offline, at most 8 minutes on one H200;
# each stage writes its own file under OUT (default gpu-check-out), see .ci/gpu_check.sh.
gpu-check:
	OUT=$(if $(OUT),$(OUT),gpu-check-out) PY=$(PY) bash .ci/gpu_check.sh

clean:
	rm -rf build *.egg-info drp_kernels/ops/_C*.so drp_kernels/_C*.so
