# Two commands do all set-up on a fresh machine (README, Quickstart):
#   make run    virtual environment + CPU torch + build, then `metakernels demo` and a short
#               meta-training run (`metakernels train`)
#   make test   the same set-up, then every test: the C++ kernel tests (ctest) and pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, from local disk where the machine has it; any other request for torch
# pulls a CUDA build of several GB.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.metakernels-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py pyproject.toml requirements-dev.txt
CMAKE_BUILD ?= build/cmake
# The nvcc on PATH may be a wrapper script; CMake and setup.py want the toolkit's own folder.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export CUDA_HOME

.PHONY: setup run test test-cpp test-python test-triton clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/metakernels demo
	rm -rf build/train-demo
	$(VENV)/bin/metakernels train --task sinusoid --algo maml --steps 300 --out build/train-demo

test: test-cpp test-python test-triton

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

test-python: setup
	$(PY) -m pytest -q

# The Triton kernels on CPU tensors in Triton's interpreter; the variable must be set before
# triton is imported, hence a pytest of its own.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton.py tests/test_properties.py -k triton

clean:
	rm -rf $(VENV) build metakernels/_C*.so *.egg-info
