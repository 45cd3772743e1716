# Quick start: `make demo` and `make test`. Both install what is missing first
# and work offline once everything is installed.
PY ?= python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
OUT ?=

.PHONY: deps sysdeps pydeps build demo test bench gpu-check cu-compile clean

sysdeps:
	@if [ ! -d "$(FMNIST_DIR)" ]; then \
	  echo "[make] installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }; \
	fi

pydeps:
	@$(PY) -c "import torch" 2>/dev/null || { echo "[make] torch missing: installing torch==2.13.0"; $(PY) -m pip install torch==2.13.0; }
	@$(PY) -c "import triton, numpy, ninja, pybind11, tqdm, matplotlib, pytest, pytest_benchmark, hypothesis" 2>/dev/null || \
	  $(PY) -m pip install -r requirements.txt

deps: sysdeps pydeps

build: pydeps
	$(PY) -m pip install --no-build-isolation --no-deps -e .

demo: deps build
	$(PY) -m drp_train compare --preset demo --out demo_out

test: deps build
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest bench -q --benchmark-only $(if $(OUT),--benchmark-json=$(OUT)/bench.json,)

# Compile every CUDA source with plain nvcc (no torch headers), as CI does.
cu-compile:
	@bash .ci/nvcc_check.sh

# The single command a session holding a GPU runs.
gpu-check:
	DRP_FORCE_CUDA=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m pytest -q $(if $(OUT),--junitxml=$(OUT)/tests.xml,)
	$(PY) -m pytest bench -q --benchmark-only $(if $(OUT),--benchmark-json=$(OUT)/bench.json,)

clean:
	rm -rf build *.egg-info drp_kernels/_C*.so
