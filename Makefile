# `make demo` and `make test` set up their virtual environment by themselves (scripts/setup_env.sh).
# STACK=default (.venv: Python 3.12, torch 2.14.1) or STACK=oldest (.venv-oldest: Python 3.10,
# torch 2.3.1) picks the tested stack (docs/INSTALL.md).
STACK ?= default
VENV := $(if $(filter oldest,$(STACK)),.venv-oldest,.venv)
LOCK := $(if $(filter oldest,$(STACK)),requirements-oldest.lock,requirements.lock)
PY := $(VENV)/bin/python
# Idle OpenMP threads sleep instead of spinning: spinning threads of processes that share the cores
# (tests launching train_net.py, multi-process CPU training) slow each other down several-fold.
export OMP_WAIT_POLICY ?= PASSIVE
K ?=
PYTEST_ARGS ?=
# make build-cuda: the GPU architectures compiled (A100, H100/H200, B200, RTX 50; PTX of the newest).
CUDA_ARCHS ?= 8.0;9.0;10.0;12.0+PTX

.PHONY: setup test demo lock build-cuda gpu-check

setup:
	@bash scripts/setup_env.sh $(STACK)

# make test K="matcher or criterion"  runs a -k selection; PYTEST_ARGS="-x -vv" passes anything else.
test: setup
	$(PY) -m pytest tests $(if $(K),-k "$(K)") $(PYTEST_ARGS)

demo: setup
	$(PY) tools/run_demo.py $(DEMO_ARGS)

lock: setup
	{ head -n 2 $(LOCK); $(PY) -m pip freeze --all --exclude-editable | $(if $(filter oldest,$(STACK)),cat,grep -v '^sal-detectron2==') ; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

# isda._C with its CUDA kernels for CUDA_ARCHS, into build/cuda (no GPU needed; the venv is untouched).
build-cuda: setup
	$(PY) scripts/build_cuda.py --archs "$(CUDA_ARCHS)" --build-dir build/cuda

# On a GPU machine: build with CUDA, isda.check, CUDA tests, benchmarks, AMP training, export; logs
# and a summary under $OUT (default gpu_check_out). GPU_CHECK_DRY=1 runs it on CPU at tiny sizes.
gpu-check:
	PYTHON=$(PY) bash scripts/gpu_check.sh
