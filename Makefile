# One-command setup + main job (`make run`) and setup + lint + tests (`make test`).
# Creates .venv and installs PyTorch from this machine's local wheels (see README), then fedsim.
PYTHON ?= python3
VENV   ?= .venv
ARCH   := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH  := torch==2.9.1 torchvision==0.24.1
else
TORCH  := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup run lint test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/fedsim run --scenario 1 --profile quick

# ruff (rules in pyproject.toml) and mypy (fedsim/ fully annotated; benchmarks/ checked too)
lint: setup
	$(VENV)/bin/ruff check fedsim tests benchmarks
	$(VENV)/bin/ruff format --check fedsim tests benchmarks
	$(VENV)/bin/mypy fedsim benchmarks

test: lint
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python benchmarks/overhead.py --profile quick --scenario 1

# Re-execute both notebooks in place: they are committed with their outputs (figures, printed
# results; no logs), so they show on the repository page. Starts Ray; a few minutes on 2 cores.
.PHONY: notebooks
notebooks: setup
	$(VENV)/bin/python notebooks/execute.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) runs
