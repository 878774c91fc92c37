# Entry points: `make demo` and `make test` set everything up first (idempotent `make install`).
VENV ?= .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu')

.PHONY: install test test-all demo bench cuda-build clean

install: $(VENV)/.ext-built

$(VENV)/.deps-installed: requirements.txt tools/install.sh
	VENV=$(VENV) bash tools/install.sh
	touch $@

# Editable install; builds actnn_mm._C against the venv's torch (no isolated build env), with the
# CUDA kernels for the visible GPUs when there are some (see setup.py).
$(VENV)/.ext-built: $(VENV)/.deps-installed setup.py $(CSRC)
	. tools/cuda_home.sh && $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q

# Also the studies marked slow (convergence, long trainings).
test-all: install
	$(PY) -m pytest -q -m ''

demo: install
	$(PY) tools/demo.py

bench: install
	$(PY) tools/benchmark.py codec

# Compiles and links the CUDA kernels into a temporary folder and loads them: needs nvcc (fails
# without it), not a GPU.
cuda-build: install
	VENV=$(VENV) bash tools/build_cuda.sh

clean:
	rm -rf build actnn_mm/*.so $(VENV)/.ext-built
