# Two entry points for a fresh machine: `make train` and `make test`. Each sets up the virtual
# environment on first use (about 2.5 minutes, 6 GB) and reuses it afterwards.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

.PHONY: setup train test test-fast lint
setup: $(STAMP)

train: $(STAMP)
	$(PY) jobs/finetune_vit.py --config jobs/configs/digits_ops_lr.yaml --out runs/digits_ops_lr

test: $(STAMP)
	$(VENV)/bin/ruff check flops_ray jobs tests
	$(VENV)/bin/ruff format --check flops_ray jobs tests
	$(PY) -m pytest -q

# The edit loop: everything but subprocess jobs, benchmarks, Ray job submission and multi-node tests.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check flops_ray jobs tests
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix flops_ray jobs tests
	$(VENV)/bin/ruff format flops_ray jobs tests
