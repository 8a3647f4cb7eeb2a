# sparse_bench: `make demo` trains a sparse model on data that needs no network,
# `make example` regenerates the README's worked example, `make test` runs the test suite.
# All create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are installed as a matching pair first; override to pick another pair,
# e.g. make install TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo example lint test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python -m sparse_bench experiment=demo resume=false

# the README's worked example on real data (Fashion-MNIST from Debian's dataset-fashion-mnist):
# 38 short runs on 2 worker processes, then docs/example/ and the README's example section
example: install
	$(BIN)/python scripts/example.py

# ruff's lint rules (pyproject.toml [tool.ruff]); CI runs this before the tests
lint: install
	$(BIN)/ruff check .

# two pytest workers, one torch thread each (tests/conftest.py): the suite on both cores
test: install
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# the quick tier while working: everything not marked slow (CI runs `make test`, i.e. everything)
test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

clean:
	rm -rf $(VENV) runs multirun .pytest_cache
