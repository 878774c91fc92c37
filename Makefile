# Entry points: `make demo` and `make test` set everything up first (idempotent `make install`).
VENV ?= .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu')

.PHONY: install test test-all demo bench cuda-build clean

install: $(VENV)/.ext-built

$(VENV)/.deps-installed: requirements.txt tools/install.sh
	VENV=$(VENV) bash tools/install.sh
	touch $@

# Editable install; builds actnn_mm._C against the venv's torch (no isolated build env).
$(VENV)/.ext-built: $(VENV)/.deps-installed setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
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

# Compiles and links the CUDA kernels into a temporary folder (no GPU needed) and loads them.
cuda-build: install
	VENV=$(VENV) bash tools/build_cuda.sh

clean:
	rm -rf build actnn_mm/*.so $(VENV)/.ext-built
