# `make demo` and `make test` set up .venv by themselves (scripts/setup_env.sh).
PY := .venv/bin/python
# Idle OpenMP threads sleep instead of spinning: spinning threads of processes that share the cores
# (tests launching train_net.py, multi-process CPU training) slow each other down several-fold.
export OMP_WAIT_POLICY ?= PASSIVE
K ?=
PYTEST_ARGS ?=

.PHONY: setup test demo lock

setup:
	@bash scripts/setup_env.sh

# make test K="matcher or criterion"  runs a -k selection; PYTEST_ARGS="-x -vv" passes anything else.
test: setup
	$(PY) -m pytest tests $(if $(K),-k "$(K)") $(PYTEST_ARGS)

demo: setup
	$(PY) tools/run_demo.py $(DEMO_ARGS)

lock: setup
	{ head -n 2 requirements.lock; $(PY) -m pip freeze --exclude-editable; } > requirements.lock.new && mv requirements.lock.new requirements.lock
