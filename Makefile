# The two set-up commands: `make demo` and `make test` (each creates .venv from requirements.lock if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu

.PHONY: venv demo demo-quick test lint format

$(VENV)/.installed: requirements.lock setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: never let pip pick a torch build by itself
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.lock
	# img2dataset for tests/test_img2dataset_http.py, without its pins (webdataset<0.3, pandas<3: they fight the
	# lock's; it runs with them); the dependencies it imports are in the lock
	$(PY) -m pip install -q --no-deps img2dataset==1.47.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tipsdistill.scripts.demo

demo-quick: venv
	$(PY) -m tipsdistill.scripts.demo --quick

# the suite on every core, whole test files per worker (their module fixtures are built once);
# TEST_WORKERS=0 runs it in this one process
TEST_WORKERS ?= auto
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 8 --dist loadfile tests

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
