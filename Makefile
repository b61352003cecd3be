# Two commands do all set-up on a fresh machine (README, Quickstart):
#   make run    virtual environment + CPU torch + build, then `metakernels demo` and a short
#               meta-training run (`metakernels train`)
#   make test   the same set-up, then every test: the C++ kernel tests (ctest), the same and the
#               cpu backend's pytest files again under AddressSanitizer + UBSan, pytest, the
#               Triton kernels in Triton's interpreter, and the wheel in a fresh environment
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

.PHONY: setup run test test-cpp test-sanitize test-python test-triton test-wheel clean

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

test: test-cpp test-sanitize test-python test-triton test-wheel

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The same C++ kernels and ctest programs under ASan + UBSan (METAKERNELS_SANITIZE in
# CMakeLists.txt): any out-of-bounds access, use-after-free, leak or undefined behaviour fails the
# run. The CUDA kernels take part through their CPU emulation (test_cuda_emulated); nvcc itself is
# not needed here, test-cpp already compiles them. Then metakernels._C itself, built with both
# sanitizers (METAKERNELS_SANITIZE=1 in setup.py) into a build tree of its own, runs the pytest
# files that drive the cpu backend (every shape, stride and input form they hold) with libasan
# preloaded (libstdc++ too, or ASan cannot intercept C++ exceptions thrown through torch).
SANITIZE_LIB := build/sanitize-py/lib
SANITIZE_TESTS ?= test_fast_weight_unroll.py test_gram.py test_checkpoint.py test_linear_hvp.py \
	test_checks.py test_judges.py test_edge_cases.py test_properties.py \
	test_fast_weight_meta_loss.py test_chunked.py test_fast_weight_mlp.py
test-sanitize: setup
	cmake -S . -B $(CMAKE_BUILD)-sanitize -DCMAKE_BUILD_TYPE=Release -DMETAKERNELS_SANITIZE=ON \
		-DMETAKERNELS_BUILD_CUDA=OFF
	cmake --build $(CMAKE_BUILD)-sanitize -j 2
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		ctest --test-dir $(CMAKE_BUILD)-sanitize --output-on-failure
	METAKERNELS_SANITIZE=1 METAKERNELS_BUILD_CUDA=0 $(PY) setup.py --quiet build \
		--build-base build/sanitize-py/tmp --build-lib $(SANITIZE_LIB)
	cd tests && export LD_PRELOAD="$$(c++ -print-file-name=libasan.so) $$(c++ -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		PYTHONPATH=$(abspath $(SANITIZE_LIB)) && \
		$(abspath $(PY)) -c "import metakernels._C as C; assert '$(SANITIZE_LIB)' in C.__file__, C.__file__" && \
		$(abspath $(PY)) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

test-python: setup
	$(PY) -m pytest -q

# The Triton kernels on CPU tensors in Triton's interpreter; the variable must be set before
# triton is imported, hence a pytest of its own.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton.py tests/test_properties.py -k triton
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton_meta_loss.py tests/test_triton_chunked.py
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_edge_cases.py tests/test_concurrency.py -k triton
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_delta_rule.py -k "triton and not int32"
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton_mlp.py

# The wheel, built from a clean copy of the tree, installed into a fresh virtual environment
# and run there; beside another torch (its kernels left out); and the user's journey through
# the README's commands there, bare and with the `train` extra (tests/test_wheel.py, marked
# slow: 3.7-5.1 min on 2 cores at load 6-9 with the wheel's objects already compiled, the journey
# 1.8-3.1 min of it; 8.1 min from a clean build (rm -rf build/wheel-test) at load 8, the journey 3.0
# min of it).
test-wheel: setup
	$(PY) -m pytest -q -m slow tests/test_wheel.py

clean:
	rm -rf $(VENV) build metakernels/_C*.so metakernels/_build_info.py *.egg-info
